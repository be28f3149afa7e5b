"""Retrieval with a CLIP dual tower: a hand-made tower whose similarity matrix (and so every rank) is known, a
tiny random CLIP against a direct unbatched computation, and the tower a workdir's contrastive stage saved."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shapes_tiny, sizes
from vlmjax import workdir
from vlmjax.data import shapes
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.eval import harness, metrics, retrieval
from vlmjax.models.clip import CLIP, CLIPConfig, clip_config
from vlmjax.train import state

# similarity[image, text]; text j describes image j. Text -> image ranks of the true image: 0, 0, 0, 1 (t3 prefers
# i2); image -> text ranks of the true text: 0, 1, 1, 1.
SIMILARITY = np.array([[0.9, 0.1, 0.2, 0.0],
                       [0.8, 0.7, 0.1, 0.0],
                       [0.3, 0.2, 0.6, 0.9],
                       [0.1, 0.0, 0.5, 0.4]], np.float32)
END = 99


class WordTokenizer:
  """'12 3' -> [12, 3]."""

  eos_token_id = END

  def encode(self, text, add_special_tokens=True):
    assert not add_special_tokens
    return [int(word) for word in text.split()]


def hand_made_apply(params, images, text_ids, text_mask):
  """Image k (filled with the value k) -> one-hot e_k; a text -> the table row of its token before the end token,
  zero unless the end token is its last valid one, so that a wrong mask or a missing end token shows."""
  image_embeddings = jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), 4)
  last = jnp.sum(text_mask, axis=1) - 1
  before = jnp.take_along_axis(text_ids, (last - 1)[:, None], axis=1)[:, 0]
  ends = jnp.take_along_axis(text_ids, last[:, None], axis=1)[:, 0] == END
  return image_embeddings, params["table"][before] * ends[:, None]


def test_hand_made_similarities_give_the_known_recalls():
  table = np.zeros((100, 4), np.float32)
  table[:4] = SIMILARITY.T  # token j's embedding is column j, so image_embeddings @ text_embeddings.T = SIMILARITY
  tower = retrieval.DualTower(hand_made_apply, {"table": table}, WordTokenizer(),
                              lambda images: np.stack(images).astype(np.float32), context_length=5)
  images = [np.full((2, 2, 3), k, np.uint8) for k in range(4)]
  captions = [[f"{40 + j} {j}"] for j in range(4)]  # ids [40 + j, j, END]
  scores = retrieval.retrieval_scores(tower, images, captions, batch_size=3)  # 4 rows: one full batch, one padded
  assert scores["text_to_image/r@1"] == 0.75 and scores["image_to_text/r@1"] == 0.25
  assert scores["r@1"] == 0.5 and scores["r@5"] == 1.0 and scores["r@10"] == 1.0
  image_embeddings, text_embeddings = retrieval.embeddings(tower, images, [c[0] for c in captions], batch_size=3)
  np.testing.assert_allclose(image_embeddings @ text_embeddings.T, SIMILARITY, rtol=1e-6)


def test_captions_are_cut_to_leave_room_for_the_end_token():
  assert retrieval.caption_ids(WordTokenizer(), "1 2 3 4 5 6", context_length=4) == [1, 2, 3, END]


CONFIG = CLIPConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "clip", image_size=64, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64),
    text=dict(vocab_size=512, context_length=24, width=32, depth=1, num_heads=2, mlp_dim=64), embed_dim=16))


def _init(config):
  return nn.meta.unbox(CLIP(config).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 24), jnp.int32),
                                         jnp.ones((1, 24), bool))["params"])


@pytest.fixture(scope="module")
def tiny_clip(tiny_shapes_dir):
  model_dir = shapes.tokenizer_dir(tiny_shapes_dir)
  tokenizer = Tokenizer.from_directory(model_dir)
  assert tokenizer.vocab_size <= CONFIG.text.vocab_size
  return retrieval.DualTower(CLIP(CONFIG).apply, {"params": _init(CONFIG)}, tokenizer,
                             ImageProcessor.from_directory(model_dir), CONFIG.text.context_length)


def test_shapes_retrieval_with_a_random_clip_matches_a_direct_computation(tiny_clip, tiny_shapes_dir, tmp_path):
  source = shapes.load(tiny_shapes_dir, "test")  # the held-out split, the default
  records = [source[i] for i in range(len(source))]
  texts = [(i, caption) for i, record in enumerate(records) for caption in record["captions"]]
  assert len(texts) > len(records)  # several captions per image
  length = CONFIG.text.context_length
  ids, mask = np.zeros((len(texts), length), np.int32), np.zeros((len(texts), length), bool)
  for row, (_, caption) in enumerate(texts):  # caption_ids' own cut is tested above
    tokens = retrieval.caption_ids(tiny_clip.tokenizer, caption, length)
    ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, True
  pixels = tiny_clip.image_processor([record["image"] for record in records])
  image_embeddings, text_embeddings, _, _ = CLIP(CONFIG).apply(tiny_clip.params, pixels, ids, mask)
  expected = metrics.retrieval_recall(np.asarray(image_embeddings @ text_embeddings.T), [i for i, _ in texts])
  scores = retrieval.shapes_retrieval(tiny_clip, tiny_shapes_dir)
  assert scores.keys() == expected.keys()
  for key in expected:
    assert scores[key] == pytest.approx(expected[key]), key
  assert harness.evaluate(None, ["shapes_retrieval"], str(tmp_path), tiny_shapes_dir,
                          clip=tiny_clip) == {"shapes_retrieval": scores}
  with pytest.raises(ValueError, match=r"shapes_retrieval needs a CLIP dual tower"):
    harness.evaluate(None, ["shapes_retrieval"], str(tmp_path), tiny_shapes_dir)


def test_load_clip_reads_the_contrastive_stage_checkpoint(tiny_shapes_dir, tmp_path):
  config = shapes_tiny.get_config()
  config.model.vision = sizes.vit("Ti/16", "clip", image_size=64, patch_size=16, width=32, depth=1, num_heads=2,
                                  mlp_dim=64)
  config.contrastive.text = dict(vocab_size=512, context_length=24, width=32, depth=1, num_heads=2, mlp_dim=64)
  config.contrastive.update(embed_dim=16, pooling="cls")
  config.train.update(steps=4, stages="contrastive:0.5,full:0.5")
  run = str(tmp_path / "run")
  workdir.write_or_check_config(run, config, allow_change=False)
  workdir.copy_model_files(shapes.tokenizer_dir(tiny_shapes_dir), run)
  params = _init(clip_config(config))
  saver = workdir.Checkpointer(run, asynchronous=False)
  saver.save(2, state.create(params, optax.sgd(0.1), step=2), {})  # what the trainer saves at the stage's end
  saver.close()

  assert retrieval.contrastive_checkpoint(run) == (2, "")
  tower = retrieval.load_clip(run)
  jax.tree.map(np.testing.assert_array_equal, tower.params["params"], params)
  assert tower.context_length == 24 and tower.image_processor.output_size == (64, 64)

  shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
  with pytest.raises(FileNotFoundError, match=r"no longer holds checkpoint 2, the end of its contrastive stage"):
    retrieval.load_clip(run)
  config.train.stages = "full"
  workdir.write_or_check_config(run, config, allow_change=True)
  assert "has no contrastive stage (train.stages='full')" in retrieval.contrastive_checkpoint(run)[1]
