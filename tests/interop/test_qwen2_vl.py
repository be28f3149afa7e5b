"""Qwen2-VL against transformers: a tiny random checkpoint written by transformers (LayerNorm vision blocks with a
plain quick-GELU MLP, every block attending over the whole image; the Qwen2 decoder with M-RoPE and q/k/v biases),
its vision tower, logits for images of several sizes and aspect ratios alone and mixed in one batch, greedy
generation through `vlmjax.load`, export, and the errors for what vlmjax cannot read or write. Tokenizer, image
processor and the checks themselves are test_qwen2_5_vl.py's (the two families share them)."""

import pytest
import transformers

import vlmjax
from test_qwen2_5_vl import (PROMPTS, SIZES, _their_inputs, _write, check_export, check_logits,
                             check_vision_tower)
from variable_tokens import assert_greedy_matches_transformers, images_of
from vlmjax.interop import hf, hf_config
from vlmjax.models.qwen_vit import QwenViTConfig

FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(directory, torch model) of the tiny Qwen2-VL, written once per module."""
  directory = str(tmp_path_factory.mktemp(FAMILY))
  return directory, _write(directory, tie=False, family=FAMILY)


@pytest.fixture(scope="module")
def vlm(checkpoint):
  """The checkpoint loaded once, so that the logits and generation tests share its compiled programs."""
  return vlmjax.load(checkpoint[0])


def test_the_config_is_qwen2_vl_s_tower():
  """Qwen2-VL's tower as `QwenViTConfig` settings: LayerNorm, a plain MLP of embed_dim * mlp_ratio, every block over
  the whole image; its window (the layout's only) is Qwen2.5-VL's 112 pixels at patch 14. (transformers' defaults
  make no whole model: the merger's 3584 outputs feed an 8192-wide text model.)"""
  vision = QwenViTConfig.from_dict(hf_config.from_hf({"model_type": FAMILY}).config.model.vision)
  assert (vision.norm, vision.gated_mlp, vision.activation) == ("layernorm", False, "quick_gelu")
  assert (vision.width, vision.mlp_dim, vision.out_width, vision.window_size) == (1280, 5120, 3584, 112)
  assert vision.full_attention_only and vision.fullatt_block_indexes == tuple(range(32))


def test_the_vision_tower_matches_transformers(checkpoint):
  check_vision_tower(*checkpoint)


def test_logits_match_transformers_for_each_size_and_a_mixed_batch(checkpoint, vlm):
  directory, model = checkpoint
  assert vlm.model_config.vision_tower == FAMILY
  print(f"max relative logit error per image size {check_logits(vlm, model, directory)}")


def test_generate_matches_transformers_greedy_tokens_with_images_of_different_sizes(checkpoint, vlm):
  directory, model = checkpoint
  assert_greedy_matches_transformers(vlm, model, directory, _their_inputs, images_of(SIZES[:4], seed=2), PROMPTS[:4])


def test_export_loads_in_transformers_with_the_same_logits(checkpoint, tmp_path):
  """`vlmjax export` writes a Qwen2VLForConditionalGeneration directory (vision_config's embed_dim, mlp_ratio and
  hidden_size; LayerNorm biases, fc1 and fc2) that gives the original's logits and reads back alike."""
  directory, model = checkpoint
  print(f"export's max relative logit error {check_export(directory, model, str(tmp_path / 'export'), FAMILY):.1e}")


def test_a_published_config_reads_as_transformers_reads_it():
  """Qwen2-VL-7B-Instruct's config.json as published: the text model's keys at the top level, vision_config with
  the old model_type and `in_chans`, M-RoPE in rope_scaling."""
  published = dict(
      architectures=["Qwen2VLForConditionalGeneration"], model_type=FAMILY, hidden_size=3584, intermediate_size=18944,
      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
      vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643,
      eos_token_id=151645, image_token_id=151655, rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]),
      vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=3584,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, model_type=FAMILY))
  ours = hf_config.from_hf(published).config.model
  assert ours == hf_config.from_hf(transformers.Qwen2VLConfig(**published).to_dict()).config.model
  assert (ours.decoder.width, ours.decoder.head_dim, ours.decoder.rope_theta) == (3584, 128, 1e6)
  assert ours.vision.out_width == 3584 and ours.decoder.mrope_section == [16, 24, 24]


def test_missing_keys_take_the_transformers_defaults():
  ours = hf_config.from_hf({"model_type": FAMILY}).config.model
  assert ours == hf_config.from_hf(transformers.Qwen2VLConfig().to_dict()).config.model


# --- what vlmjax refuses, with the key and value named ----------------------------------------------------------

def _config(vision=None, text=None) -> dict:
  values = transformers.Qwen2VLConfig().to_dict()
  values["vision_config"].update(vision or {})
  values["text_config"].update(text or {})
  return values


@pytest.mark.parametrize("changes,message", [
    (dict(vision=dict(hidden_act="relu")), "vision_config.hidden_act='relu' is not supported"),
    (dict(vision=dict(in_channels=4)), "vision_config.in_channels=4; vlmjax reads RGB images"),
    (dict(text=dict(use_sliding_window=True)), "text_config.use_sliding_window=True is not supported"),
    (dict(text=dict(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 20]))),
     r"mrope_section=\[16, 24, 20\] must sum to half the head size \(64\)"),
])
def test_unsupported_values_are_named(changes, message):
  with pytest.raises(ValueError, match=message):
    hf_config.from_hf(_config(**changes))


@pytest.mark.parametrize("changes,message", [
    (dict(norm="rmsnorm"), r"model\.vision\.norm='rmsnorm' cannot be written as a Hugging Face qwen2_vl checkpoint"),
    (dict(gated_mlp=True), r"model\.vision\.gated_mlp=True cannot be written as a Hugging Face qwen2_vl"),
    (dict(fullatt_block_indexes=[1]), r"model\.vision\.fullatt_block_indexes=\(1,\) cannot be written .* "
                                      r"\(it needs \(0, 1, 2\)\)"),
    (dict(mlp_dim=40), r"model\.vision\.mlp_dim=40 cannot be written as a Hugging Face qwen2_vl checkpoint .* a "
                       r"multiple of model\.vision\.width=32"),
])
def test_export_refuses_what_qwen2_vl_cannot_express(checkpoint, tmp_path, changes, message):
  config = hf.read_config(checkpoint[0]).config
  config.model.vision.update(changes)
  with pytest.raises(ValueError, match=message):
    hf.save_pretrained(str(tmp_path), config, params=None)
