"""The stage chain of a config, the contrastive stage's dual tower and its image-caption examples."""

import dataclasses

import numpy as np
import pytest

from configs import shapes_tiny
from vlmjax.data import shapes, shapes_tasks
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.train import stages


def test_stages_split_the_steps_by_their_fractions():
  chain = stages.parse_stages("contrastive:0.2, align:0.3,full", 100)
  assert [(s.name, s.start, s.end) for s in chain] == [("contrastive", 0, 20), ("align", 20, 50), ("full", 50, 100)]
  assert [s.is_contrastive for s in chain] == [True, False, False]


@pytest.mark.parametrize("spec,message", [
    ("", "train.stages is empty"),
    ("pretrain", "unknown training stage 'pretrain'"),
    ("align:0.0,full", "stage 'align' gets no steps"),
])
def test_bad_stage_chains_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    stages.parse_stages(spec, 100)


def test_the_pretraining_models_take_the_runs_vision_tower_and_say_when_their_section_is_missing():
  config = shapes_tiny.get_config()
  clip = stages.clip_config(config)
  assert clip.vision.width == config.model.vision.width and clip.text.vocab_size == config.contrastive.text.vocab_size
  assert clip.loss == "sigmoid"
  classifier = stages.classifier_config(config)
  assert classifier.vision == clip.vision and classifier.num_labels == shapes_tasks.NUM_OBJECT_LABELS
  assert [s.pretrains_vision for s in stages.parse_stages("contrastive:0.3,classify:0.3,full", 10)] == [
      True, True, False]
  del config.contrastive, config.classify
  for stage in ("contrastive", "classify"):
    with pytest.raises(ValueError, match=f"no `{stage}` section"):
      stages.pretraining_config(config, stage)


def test_object_labels_are_the_scenes_objects(tiny_shapes_dir):
  to_example = stages.object_labels_example_fn(shapes.tokenizer_dir(tiny_shapes_dir))
  source = shapes.load(tiny_shapes_dir, "train")
  for index in range(5):
    record = source[index]
    labels = to_example(record, np.random.default_rng(0))["labels"]
    named = {label for label, value in zip(shapes_tasks.OBJECT_LABELS, labels) if value}
    expected = set()
    for obj in record["scene"]:  # checked against the scene description, not through object_labels
      expected |= {obj["colour"] + " " + obj["shape"], obj["shape"], obj["colour"], obj["size"] + " " + obj["shape"]}
    assert named == expected


def test_the_contrastive_stage_trains_at_its_own_learning_rate_when_the_config_sets_one():
  config = shapes_tiny.get_config()
  contrastive, full = stages.parse_stages("contrastive:0.5,full", 10)
  config.contrastive.learning_rate = None
  assert stages.optim_config(config, contrastive).learning_rate == config.optim.learning_rate
  config.contrastive.learning_rate = 7e-3
  assert stages.optim_config(config, contrastive).learning_rate == 7e-3
  assert stages.optim_config(config, contrastive).warmup_steps == config.optim.warmup_steps
  assert stages.optim_config(config, full).learning_rate == config.optim.learning_rate
  assert "learning_rate" not in dataclasses.asdict(stages.clip_config(config))


def test_a_caption_example_is_one_of_the_records_captions_ending_with_the_end_token(tiny_shapes_dir):
  clip = stages.clip_config(shapes_tiny.get_config())
  model_dir = shapes.tokenizer_dir(tiny_shapes_dir)
  to_example = stages.caption_example_fn(clip, model_dir)
  tokenizer = Tokenizer.from_directory(model_dir)
  record = shapes.load(tiny_shapes_dir, "train")[0]
  seen = set()
  for seed in range(12):
    example = to_example(record, np.random.default_rng(seed))
    ids = example["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) <= clip.text.context_length
    seen.add(tokenizer.backend.decode(ids[:-1].tolist()))
    assert example["pixel_values"].shape == (clip.vision.image_size, clip.vision.image_size, 3)
  assert seen <= set(record["captions"]) and len(seen) > 1
