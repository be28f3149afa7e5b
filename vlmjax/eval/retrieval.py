"""Image-text retrieval with a CLIP dual tower: Recall@1/5/10 both ways, from embeddings (no text is generated).

    tower = DualTower(CLIP(config).apply, {"params": params}, tokenizer, image_processor, context_length=40)
    retrieval_scores(tower, images, captions)   # captions: per image, the texts that describe it
    # -> {"r@1", "r@5", "r@10", "image_to_text/r@1", ..., "text_to_image/r@10"}; r@k is the mean of the two ways

`shapes_retrieval` ranks a shapes split's images against all their captions; `load_clip(workdir)` reads the
dual tower that a run's contrastive stage trained.
"""

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import workdir as workdir_lib
from vlmjax.data import shapes
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.eval import metrics
from vlmjax.models.clip import CLIP, clip_config


@dataclasses.dataclass(frozen=True)
class DualTower:
  """A CLIP dual tower and what feeds it.

  apply_fn(params, images float32[B, H, W, 3], text_ids int32[B', T], text_mask bool[B', T]) returns (image
  embeddings float[B, E], text embeddings float[B', E], ...), as `CLIP(config).apply` does. The tokenizer gives
  `encode(text, add_special_tokens=False) -> ids` and `eos_token_id` (vlmjax.data.tokenizer.Tokenizer); the
  image processor maps a list of images to float32[B, H, W, 3] pixels (vlmjax.data.images.ImageProcessor).
  """

  apply_fn: Callable
  params: Any
  tokenizer: Any
  image_processor: Callable[[list], np.ndarray]
  context_length: int  # T: captions are cut to T - 1 tokens, then the end token


def caption_ids(tokenizer, caption: str, context_length: int) -> list[int]:
  """The caption's ids, cut to context_length - 1, then the end token where CLIP pools, as the contrastive stage
  trains on them (train/stages.py, caption_example_fn)."""
  return tokenizer.encode(caption, add_special_tokens=False)[:context_length - 1] + [tokenizer.eos_token_id]


def _batches(rows: np.ndarray, batch_size: int):
  """Slices of `batch_size` rows, the last one padded by repeating its last row (one compiled shape); with the
  number of real rows in each."""
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    yield np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)]), len(batch)


def embeddings(tower: DualTower, images: list, texts: list[str], batch_size: int = 64
               ) -> tuple[np.ndarray, np.ndarray]:
  """(image embeddings float32[N, E], text embeddings float32[M, E]) of N images and M texts.

  Each tower runs in batches of batch_size; CLIP computes both towers in one call, so the image batches go with
  one dummy text and the text batches with one dummy image, and the dummies' embeddings are dropped.
  """
  if not images or not texts:
    raise ValueError(f"retrieval needs at least one image and one text, got {len(images)} and {len(texts)}")
  apply = jax.jit(tower.apply_fn)
  rows = [caption_ids(tower.tokenizer, text, tower.context_length) for text in texts]
  text_ids = np.zeros((len(texts), tower.context_length), np.int32)
  for i, row in enumerate(rows):
    text_ids[i, :len(row)] = row
  text_mask = np.arange(tower.context_length)[None, :] < np.asarray([len(row) for row in rows])[:, None]
  image_parts, text_parts, dummy_image = [], [], None
  for indices, count in _batches(np.arange(len(images)), batch_size):
    pixels = np.asarray(tower.image_processor([images[i] for i in indices]), np.float32)  # [B, H, W, 3]
    dummy_image = pixels[:1] if dummy_image is None else dummy_image
    image_parts.append(np.asarray(apply(tower.params, pixels, text_ids[:1], text_mask[:1])[0])[:count])
  for indices, count in _batches(np.arange(len(texts)), batch_size):
    out = apply(tower.params, dummy_image, text_ids[indices], text_mask[indices])
    text_parts.append(np.asarray(out[1])[:count])
  return np.concatenate(image_parts).astype(np.float32), np.concatenate(text_parts).astype(np.float32)


def retrieval_scores(tower: DualTower, images: list, captions: list[list[str]], batch_size: int = 64
                     ) -> dict[str, float]:
  """Recall@1/5/10 both ways of N images against all their captions (captions[i]: the texts of image i, at least
  one), ranked by the dot product of the towers' unit embeddings (cosine similarity)."""
  if len(images) != len(captions):
    raise ValueError(f"retrieval needs one caption list per image: {len(images)} images, {len(captions)} lists")
  texts = [text for texts_of_image in captions for text in texts_of_image]
  text_to_image = [i for i, texts_of_image in enumerate(captions) for _ in texts_of_image]
  image_embeddings, text_embeddings = embeddings(tower, images, texts, batch_size)
  return metrics.retrieval_recall(image_embeddings @ text_embeddings.T, text_to_image)


def shapes_retrieval(tower: DualTower, data_dir: str, limit: int | None = None,
                     split: str = "test") -> dict[str, float]:
  """Retrieval among the first `limit` images of a shapes split (all if None) and every caption of theirs."""
  source = shapes.load(data_dir, split)
  records = [source[i] for i in range(len(source) if limit is None else min(limit, len(source)))]
  return retrieval_scores(tower, [record["image"] for record in records], [record["captions"] for record in records])


@dataclasses.dataclass(frozen=True)
class RetrievalBenchmark:
  name: str
  run: Callable[[DualTower, str, int | None, str], dict[str, float]]  # (tower, data_dir, limit, split) -> metrics
  limit: int | None = None  # default number of images (the first ones); None: all


BENCHMARKS: dict[str, RetrievalBenchmark] = {
    "shapes_retrieval": RetrievalBenchmark("shapes_retrieval", shapes_retrieval, limit=1000),
}


def contrastive_checkpoint(workdir: str) -> tuple[int | None, str]:
  """(the step that ends the run's last contrastive stage if its checkpoint is on disk, else None; why not)."""
  if not workdir_lib.is_workdir(workdir):
    return None, f"{workdir} is not a vlmjax training workdir"
  config = workdir_lib.read_config(workdir)
  contrastive = [s for s in workdir_lib.parse_stages(config.train.stages, config.train.steps) if s.is_contrastive]
  if not contrastive:
    return None, f"{workdir} has no contrastive stage (train.stages={config.train.stages!r})"
  step = contrastive[-1].end
  if not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
    return None, (f"{workdir} no longer holds checkpoint {step}, the end of its contrastive stage "
                  f"(train.keep_checkpoints={config.train.keep_checkpoints} kept only later ones)")
  return step, ""


def load_clip(workdir: str) -> DualTower:
  """The CLIP dual tower a workdir's contrastive stage trained, with the workdir's tokenizer and image processor."""
  step, why_not = contrastive_checkpoint(workdir)
  if step is None:
    raise FileNotFoundError(f"no CLIP dual tower to evaluate retrieval with: {why_not}")
  config = clip_config(workdir_lib.read_config(workdir))
  size, length = config.vision.image_size, config.text.context_length
  model = CLIP(config)
  abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.ones((1, length), jnp.int32),
      jnp.ones((1, length), bool)))["params"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  checkpointer = workdir_lib.Checkpointer(workdir, asynchronous=False)
  params = checkpointer.restore_params(step, abstract)
  checkpointer.close()
  return DualTower(model.apply, {"params": params}, Tokenizer.from_directory(workdir),
                   ImageProcessor.from_directory(workdir), length)
