"""What each training stage trains, on what: the stage chain of a config, each stage's model and its examples.

    train.stages = "contrastive:0.2,full:0.8"   # names and fractions of train.steps

`contrastive` trains the CLIP dual tower (the run's vision tower + `contrastive.text`) on image-caption pairs;
the VLM stages (`align`, `finetune`, `full`) train the VLM on conversations. A VLM stage after a contrastive one
starts from its vision tower, as LLaVA starts from a CLIP and PaliGemma from a SigLIP.
"""

import dataclasses

import ml_collections
import numpy as np

from vlmjax.data import pipeline, shapes_tasks
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.models.clip import CLIPConfig
from vlmjax.models.config import SHARED_KEYS
from vlmjax.models.vlm import VLMConfig
from vlmjax.train import optim

CONTRASTIVE = "contrastive"
# Keys of the `contrastive` section that set how the stage trains, not the dual tower.
STAGE_ONLY_KEYS = ("batch_size", "learning_rate")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  start: int  # global step at which the stage begins
  end: int  # global step after its last update

  @property
  def steps(self) -> int:
    return self.end - self.start

  @property
  def is_contrastive(self) -> bool:
    return self.name == CONTRASTIVE


def parse_stages(spec: str, total_steps: int) -> list[Stage]:
  """'align:0.2,finetune:0.8' (fractions of total_steps; a lone name takes all) -> Stages, checked."""
  stages, start = [], 0
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items:
    raise ValueError("train.stages is empty: name at least one stage, e.g. 'full'")
  for i, item in enumerate(items):
    name, _, fraction = item.partition(":")
    optim.check_stage(name)
    end = total_steps if i == len(items) - 1 else start + round(float(fraction or 1.0) * total_steps)
    if end <= start:
      raise ValueError(f"train.stages: stage {name!r} gets no steps ({item!r} of train.steps={total_steps})")
    stages.append(Stage(name, start, end))
    start = end
  return stages


def clip_config(config: ml_collections.ConfigDict) -> CLIPConfig:
  """The contrastive stage's dual tower: the run's `model.vision` with the `contrastive` section's text tower,
  embedding size, pooling, loss and temperature (every key but the stage's own training settings)."""
  if "contrastive" not in config:
    raise ValueError("train.stages has a 'contrastive' stage but the config has no `contrastive` section (the "
                     "text tower, embed_dim, pooling, loss, batch_size): see configs/shapes_tiny.py")
  section = {key: value for key, value in config.contrastive.items() if key not in STAGE_ONLY_KEYS}
  shared = {key: config.model[key] for key in SHARED_KEYS if key in config.model}
  return CLIPConfig.from_dict({**shared, "vision": config.model.vision, **section}, "contrastive")


def optim_config(config: ml_collections.ConfigDict, stage: Stage) -> ml_collections.ConfigDict:
  """The `optim` section a stage trains with: a contrastive stage takes `contrastive.learning_rate` when the
  config sets one (the vision tower learns shapes from scratch there and stands a larger rate than the LM)."""
  learning_rate = config.get("contrastive", {}).get("learning_rate") if stage.is_contrastive else None
  if learning_rate is None:
    return config.optim
  return ml_collections.ConfigDict({**config.optim.to_dict(), "learning_rate": learning_rate})


def shapes_example_fn(config: ml_collections.ConfigDict, model_config: VLMConfig, model_dir: str):
  """(shapes record, rng) -> VLM training arrays (a conversation about the image), with the tokenizer and image
  processor saved in model_dir."""
  encoder = pipeline.ConversationEncoder(tokenizer=Tokenizer.from_directory(model_dir),
                                         image_token_id=model_config.image_token_id,
                                         tokens_per_image=model_config.tokens_per_image,
                                         max_length=config.data.length)
  image_processor = ImageProcessor.from_directory(model_dir)

  def to_example(record, rng):
    ids, assistant = encoder(shapes_tasks.training_messages(record, rng))
    return pipeline.example_arrays(ids, assistant, image_processor([record["image"]])[0])
  return to_example


def caption_example_fn(model_config: CLIPConfig, model_dir: str):
  """(shapes record, rng) -> a contrastive pair {input_ids: the caption's ids ending with the end token (CLIP
  pools there), pixel_values}; the caption is one of the record's phrasings, drawn by rng."""
  tokenizer = Tokenizer.from_directory(model_dir)
  image_processor = ImageProcessor.from_directory(model_dir)
  length = model_config.text.context_length

  def to_example(record, rng: np.random.Generator):
    caption = record["captions"][rng.integers(len(record["captions"]))]
    ids = tokenizer.backend.encode(caption, add_special_tokens=False).ids[:length - 1] + [tokenizer.eos_token_id]
    return {"input_ids": np.asarray(ids, np.int32), "pixel_values": image_processor([record["image"]])[0]}
  return to_example
