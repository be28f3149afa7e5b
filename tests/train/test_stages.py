"""The stage chain of a config, the contrastive stage's dual tower and its image-caption examples."""

import dataclasses

import numpy as np
import pytest

from configs import shapes_tiny
from vlmjax import workdir
from vlmjax.data import shapes, shapes_tasks
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.models.clip import clip_config
from vlmjax.models.vlm import VLMConfig
from vlmjax.train import optim, stages


def test_every_stage_a_run_may_name_says_what_it_trains():
  assert set(optim.TRAINABLE) == set(workdir.STAGES)


def test_stages_split_the_steps_by_their_fractions():
  chain = workdir.parse_stages("contrastive:0.2, align:0.3,full", 100)
  assert [(s.name, s.start, s.end) for s in chain] == [("contrastive", 0, 20), ("align", 20, 50), ("full", 50, 100)]
  assert [s.is_contrastive for s in chain] == [True, False, False]


@pytest.mark.parametrize("spec,message", [
    ("", "train.stages is empty"),
    ("pretrain", "unknown training stage 'pretrain'"),
    ("align:0.0,full", "stage 'align' gets no steps"),
])
def test_bad_stage_chains_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    workdir.parse_stages(spec, 100)


def test_the_pretraining_models_take_the_runs_vision_tower_and_say_when_their_section_is_missing():
  config = shapes_tiny.get_config()
  clip = clip_config(config)
  assert clip.vision.width == config.model.vision.width and clip.text.vocab_size == config.contrastive.text.vocab_size
  assert clip.loss == "sigmoid"
  classifier = stages.classifier_config(config)
  assert classifier.vision == clip.vision and classifier.label_classes == (6, 9, 3, 2)
  config.classify.position_bins = 4
  assert stages.classifier_config(config).label_classes == (6, 9, 3, 5, 5, 2)
  assert [s.pretrains_vision for s in workdir.parse_stages("contrastive:0.3,classify:0.3,full", 10)] == [
      True, True, False]
  del config.contrastive, config.classify
  for stage in ("contrastive", "classify"):
    with pytest.raises(ValueError, match=f"no `{stage}` section"):
      stages.pretraining_config(config, stage)


def test_patch_labels_name_the_object_under_each_patch_centre():
  """A hand-made scene on a 64 px image, 8 x 8 patches (centres at 4, 12, ..., 60)."""
  record = {"image": np.zeros((64, 64, 3), np.uint8), "scene": [
      {"shape": "star", "colour": "green", "size": "large", "box": [8, 0, 25, 13]},  # columns 1-2, rows 0-1
      {"shape": "circle", "colour": "red", "size": "small", "box": [52, 44, 64, 62]}]}  # column 6-7, rows 5-7
  assert shapes_tasks.patch_groups(4) == ("shape", "colour", "size", "column", "row", "box centre")
  assert shapes_tasks.patch_classes(4) == (6, 9, 3, 5, 5, 2)
  labels = shapes_tasks.patch_labels(record, grid=8, position_bins=4).reshape(8, 8, 6)
  # Shape, colour, size, then the quarter of the image's width and height that holds the box centre: the
  # star's (16.5, 6.5) is in the second quarter across and the first down, the circle's (58, 53) in the last.
  star = [1 + shapes_tasks.PATCH_ATTRIBUTES[a].index(v) for a, v in (("shape", "star"), ("colour", "green"),
                                                                     ("size", "large"))] + [2, 1]
  circle = [1 + shapes_tasks.PATCH_ATTRIBUTES[a].index(v) for a, v in (("shape", "circle"), ("colour", "red"),
                                                                       ("size", "small"))] + [4, 4]
  expected = np.zeros((8, 8, 5), np.int32)
  expected[0:2, 1:3] = star
  expected[5:8, 6:8] = circle
  np.testing.assert_array_equal(labels[..., :5], expected)
  # The box centres: the star's lies in column 2, row 0; the circle's in column 7, row 6.
  centres = np.zeros((8, 8), np.int32)
  centres[0, 2] = centres[6, 7] = 1
  np.testing.assert_array_equal(labels[..., 5], centres)
  # The same scene at another grid: 4 x 4 patches of 16 px (centres 8, 24, 40, 56).
  coarse = shapes_tasks.patch_labels(record, grid=4, position_bins=4).reshape(4, 4, 6)
  assert (coarse[0, 0:2, :5] == star).all() and (coarse[3, 3, :5] == circle).all()
  assert (coarse[..., :5] > 0).any(-1).sum() == 3
  assert coarse[0, 1, 5] == coarse[3, 3, 5] == 1 and coarse[..., 5].sum() == 2
  # Without position groups: the same attribute and box-centre groups, and only them.
  assert shapes_tasks.patch_classes() == (6, 9, 3, 2)
  plain = shapes_tasks.patch_labels(record, grid=8).reshape(8, 8, 4)
  np.testing.assert_array_equal(plain, labels[..., [0, 1, 2, 5]])


def test_the_patch_loss_is_each_groups_cross_entropy_summed():
  from vlmjax.models.classifier import patch_classification_loss
  rng = np.random.default_rng(0)
  classes = (6, 9, 3)
  logits = rng.normal(size=(2, 5, sum(classes))).astype(np.float32)
  labels = np.stack([rng.integers(0, n, size=(2, 5)) for n in classes], -1)
  expected, start = 0.0, 0
  for g, n in enumerate(classes):  # by hand: -log softmax of the right class, averaged over images and patches
    group = logits[..., start:start + n]
    log_probs = group - np.log(np.exp(group).sum(-1, keepdims=True))
    expected += -np.take_along_axis(log_probs, labels[..., g:g + 1], -1).mean()
    start += n
  np.testing.assert_allclose(patch_classification_loss(logits, labels, classes), expected, rtol=1e-5)


def test_the_classify_stage_examples_label_every_patch(tiny_shapes_dir):
  to_example = stages.patch_labels_example_fn(shapes.tokenizer_dir(tiny_shapes_dir), grid=8, position_bins=4)
  record = shapes.load(tiny_shapes_dir, "train")[0]
  example = to_example(record, np.random.default_rng(0))
  assert example["labels"].shape == (64, 6) and example["labels"].dtype == np.int32
  shapes_seen = {shapes_tasks.PATCH_ATTRIBUTES["shape"][k - 1] for k in example["labels"][:, 0] if k}
  assert shapes_seen <= {obj["shape"] for obj in record["scene"]} and shapes_seen
  assert example["labels"][:, -1].sum() == len(record["scene"])  # one box centre per object


def test_the_contrastive_stage_trains_at_its_own_learning_rate_when_the_config_sets_one():
  config = shapes_tiny.get_config()
  contrastive, full = workdir.parse_stages("contrastive:0.5,full", 10)
  config.contrastive.learning_rate = None
  assert stages.optim_config(config, contrastive).learning_rate == config.optim.learning_rate
  config.contrastive.learning_rate = 7e-3
  assert stages.optim_config(config, contrastive).learning_rate == 7e-3
  assert stages.optim_config(config, contrastive).warmup_steps == config.optim.warmup_steps
  assert stages.optim_config(config, full).learning_rate == config.optim.learning_rate
  assert "learning_rate" not in dataclasses.asdict(clip_config(config))


def test_a_pretraining_stage_may_train_with_its_own_optimizer():
  config = shapes_tiny.get_config()
  classify, finetune = workdir.parse_stages("classify:0.5,finetune", 10)
  config.optim.update(optimizer="muon", muon_learning_rate=0.01)
  config.classify.update(optimizer="adamw", learning_rate=3e-3)
  assert (stages.optim_config(config, classify).optimizer, stages.optim_config(config, classify).learning_rate) \
      == ("adamw", 3e-3)
  assert (stages.optim_config(config, finetune).optimizer, stages.optim_config(config, finetune).learning_rate) \
      == ("muon", config.optim.learning_rate)
  config.classify.optimizer = None
  assert stages.optim_config(config, classify).optimizer == "muon"
  assert "optimizer" not in dataclasses.asdict(stages.classifier_config(config))


def test_a_caption_example_is_one_of_the_records_captions_ending_with_the_end_token(tiny_shapes_dir):
  clip = clip_config(shapes_tiny.get_config())
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


def test_a_finetune_example_weighs_answers_1_the_prompt_text_its_weight_and_the_image_nothing(tiny_shapes_dir):
  config = shapes_tiny.get_config()
  model_config = VLMConfig.from_dict(config.model)
  model_dir = shapes.tokenizer_dir(tiny_shapes_dir)
  record = shapes.load(tiny_shapes_dir, "train")[0]
  examples = {}
  for weight in (0.0, 0.25):
    config.data.prompt_loss_weight = weight
    examples[weight] = stages.shapes_example_fn(config, model_config, model_dir)(record, np.random.default_rng(0))
  answers, prompts = examples[0.0], examples[0.25]
  np.testing.assert_array_equal(prompts["targets"], answers["targets"])
  is_answer = answers["loss_mask"] == 1
  is_image = answers["targets"] == model_config.image_token_id
  assert set(np.unique(answers["loss_mask"])) == {0.0, 1.0} and is_answer.sum() > 10 and is_image.sum() == 16
  np.testing.assert_array_equal(prompts["loss_mask"][is_answer], 1.0)
  np.testing.assert_array_equal(prompts["loss_mask"][is_image], 0.0)
  prompt = ~is_answer & ~is_image
  prompt[-1] = False  # the last position predicts nothing
  assert prompt.sum() > 50
  np.testing.assert_array_equal(prompts["loss_mask"][prompt], 0.25)
