"""What each training stage trains, on what: the stage chain of a config, each stage's model and its examples.

    train.stages = "contrastive:0.2,full:0.8"   # names and fractions of train.steps

Two stages pretrain the run's vision tower inside another model: `contrastive` trains the CLIP dual tower (the
vision tower + `contrastive.text`) on image-caption pairs, `classify` trains it with a classification head on
each patch (the shape, colour and size of the object under it, as dense-prediction pretraining trains a tower).
The VLM stages (`align`, `finetune`, `full`) train the VLM on conversations. A VLM stage after a pretraining
one starts from its vision tower, as LLaVA starts from a CLIP and PaliGemma from a SigLIP.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax.data import pipeline, shapes_tasks
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.models.classifier import ClassifierConfig, ViTClassifier
from vlmjax.models.clip import CLIP, CLIPConfig, clip_config
from vlmjax.models.config import PRETRAINING_OPTIM_KEYS, pretraining_section
from vlmjax.models.vlm import VLMConfig
from vlmjax.workdir import CLASSIFY, CONTRASTIVE, Stage

def position_bins(config: ml_collections.ConfigDict) -> int:
  """The classify stage's position label groups (`shapes_tasks.patch_labels`): 0, none, where unset."""
  return config[CLASSIFY].get("position_bins", 0)


def classifier_config(config: ml_collections.ConfigDict) -> ClassifierConfig:
  """The classify stage's model: the run's `model.vision` with a per-patch head over the shapes attributes."""
  section = pretraining_section(config, CLASSIFY)  # names a missing section
  label_classes = shapes_tasks.patch_classes(position_bins(config))
  return ClassifierConfig.from_dict({**section, "label_classes": label_classes}, CLASSIFY)


@dataclasses.dataclass(frozen=True)
class PretrainingModel:
  """What a vision-pretraining stage trains: the model around the run's vision tower, the arguments that
  initialize it, its examples and its batch."""

  module: type[nn.Module]
  config: CLIPConfig | ClassifierConfig
  init_inputs: dict[str, jax.Array]
  to_example: Callable[[dict, np.random.Generator], dict[str, np.ndarray]]
  batch_size: int
  length: int  # tokens per example (captions); 0 when the examples have none


def pretraining_config(config: ml_collections.ConfigDict, stage: str) -> CLIPConfig | ClassifierConfig:
  """The model config of pretraining stage `stage` ('contrastive' or 'classify'), checked."""
  return clip_config(config) if stage == CONTRASTIVE else classifier_config(config)


def pretraining_model(config: ml_collections.ConfigDict, stage: str, model_dir: str) -> PretrainingModel:
  """The model, examples and batch of pretraining stage `stage`, with the tokenizer and image processor saved
  in model_dir."""
  model_config = pretraining_config(config, stage)
  size = model_config.vision.image_size
  images = jnp.zeros((1, size, size, 3))
  if stage == CONTRASTIVE:
    length = model_config.text.context_length
    inputs = dict(images=images, text_ids=jnp.ones((1, length), jnp.int32), text_mask=jnp.ones((1, length), bool))
    return PretrainingModel(CLIP, model_config, inputs, caption_example_fn(model_config, model_dir),
                            config[stage].batch_size, length)
  to_example = patch_labels_example_fn(model_dir, model_config.vision.grid_size, position_bins(config))
  return PretrainingModel(ViTClassifier, model_config, dict(images=images), to_example, config[stage].batch_size, 0)


def optim_config(config: ml_collections.ConfigDict, stage: Stage) -> ml_collections.ConfigDict:
  """The `optim` section a stage trains with: a pretraining stage takes its section's `PRETRAINING_OPTIM_KEYS` where
  the config sets them (a vision tower learning from scratch stands a larger rate than the language model)."""
  section = config.get(stage.name) if stage.pretrains_vision else None
  overrides = {key: section[key] for key in PRETRAINING_OPTIM_KEYS
               if section is not None and section.get(key) is not None}
  if not overrides:
    return config.optim
  return ml_collections.ConfigDict({**config.optim.to_dict(), **overrides})


def shapes_example_fn(config: ml_collections.ConfigDict, model_config: VLMConfig, model_dir: str):
  """(shapes record, rng) -> VLM training arrays (a conversation about the image), with the tokenizer and image
  processor saved in model_dir."""
  encoder = pipeline.ConversationEncoder(tokenizer=Tokenizer.from_directory(model_dir),
                                         image_token_id=model_config.image_token_id,
                                         tokens_per_image=model_config.tokens_per_image,
                                         max_length=config.data.length)
  image_processor = ImageProcessor.from_directory(model_dir)
  if config.data.choice_answer not in shapes_tasks.CHOICE_ANSWERS:
    raise ValueError(f"data.choice_answer={config.data.choice_answer!r}: choose one of {shapes_tasks.CHOICE_ANSWERS}")

  def to_example(record, rng):
    messages = shapes_tasks.training_messages(record, rng, config.data.questions_per_type,
                                              config.data.position_questions,
                                              config.data.position_centre_first,
                                              config.data.other_turns, config.data.choice_answer,
                                              config.data.other_turns_first,
                                              config.data.size_questions)
    ids, assistant = encoder(messages)
    # Answers weigh 1 in the loss, the prompt's text prompt_loss_weight, the image placeholders nothing.
    weights = np.where(assistant, 1.0, np.where(ids == model_config.image_token_id, 0.0,
                                                config.data.prompt_loss_weight))
    return pipeline.example_arrays(ids, weights, image_processor([record["image"]])[0])
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


def patch_labels_example_fn(model_dir: str, grid: int, position_bins: int = 0):
  """(shapes record, rng) -> {pixel_values, labels: int32[grid * grid, G] what each patch shows
  (`shapes_tasks.patch_labels`)}."""
  image_processor = ImageProcessor.from_directory(model_dir)

  def to_example(record, rng: np.random.Generator):
    del rng
    return {"pixel_values": image_processor([record["image"]])[0],
            "labels": shapes_tasks.patch_labels(record, grid, position_bins)}
  return to_example
