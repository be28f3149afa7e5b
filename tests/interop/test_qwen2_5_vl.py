"""Qwen2.5-VL against transformers: a tiny random checkpoint written by transformers (windowed and full-attention
vision blocks, M-RoPE, q/k/v biases; untied and tied embeddings), the image processor's patches and token counts,
the vision tower, logits for images of several sizes and aspect ratios alone and mixed in a batch, greedy
generation through `vlmjax.load` and `vlmjax generate`, export, and the errors for what vlmjax cannot run or write.
The checks of the tower, the logits and export are functions that test_qwen2_vl.py runs for Qwen2-VL too."""

import json
import os
import re

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

import vlmjax
from conftest import CORPUS
from test_hf import max_relative_error
from variable_tokens import (assert_generate_command_matches, assert_greedy_matches_transformers,
                             assert_new_sizes_reuse_prefill, chat_rows, images_of, padded)
from vlmjax.data.images import ImageProcessor, QwenImageProcessor
from vlmjax import cli
from vlmjax.interop import hf, hf_config
from vlmjax.models import qwen_vl
from vlmjax.models.qwen_vit import QwenViT, host_mrope_positions, mrope_positions
from vlmjax.models.vlm import VLMConfig

PAD, START, END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
# Qwen2.5-VL's template, content parts in order (images as vision_start, image_pad, vision_end).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PATCH, MERGE, MIN_PIXELS, MAX_PIXELS = 4, 2, 16 * 16, 64 * 64  # factor 8: sides in multiples of 8 pixels
# (height, width): landscape, portrait, square, very wide, above the pixel budget, below the minimum.
SIZES = [(37, 52), (61, 29), (45, 45), (20, 90), (300, 200), (5, 9)]
PROMPTS = ["What is in the picture?", "Describe the image in detail, please.", "caption en",
           "How many shapes are there?", "The quick brown fox?", "detect circle"]



def _their_image_processor():
  return transformers.Qwen2VLImageProcessorPil(
      patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, image_mean=[0.4, 0.5, 0.6],
      image_std=[0.3, 0.2, 0.25], size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


def _tokenizer(directory: str):
  """A BPE tokenizer with Qwen's special tokens and chat template, saved by transformers."""
  backend = tokenizers.Tokenizer(models.BPE(unk_token=PAD))
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  specials = [PAD, START, END, VISION_START, VISION_END, IMAGE_PAD]
  backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials,
                                                          show_progress=False))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END, pad_token=PAD,
                                                   chat_template=CHAT_TEMPLATE)
  tokenizer.save_pretrained(directory)
  return tokenizer


# Each family's transformers classes (config, model) and tiny tower: Qwen2.5-VL's windows of 2 x 2 merge units with
# block 1 attending over the whole image; Qwen2-VL's LayerNorm blocks with a quick-GELU MLP twice as wide, every block
# over the whole image (its `hidden_size` is the merger's output).
FAMILIES = {"qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
            "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration)}
VISION = {"qwen2_5_vl": dict(hidden_size=32, intermediate_size=48, window_size=16, out_hidden_size=64,
                             fullatt_block_indexes=[1]),
          "qwen2_vl": dict(embed_dim=32, mlp_ratio=2, hidden_size=64)}


def _write(directory: str, tie: bool, family: str = "qwen2_5_vl"):
  """The tokenizer, image processor and a Qwen2_5_VLForConditionalGeneration (or the family's) with every weight
  perturbed."""
  tokenizer = _tokenizer(directory)
  _their_image_processor().save_pretrained(directory)
  ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
      ("image_token_id", IMAGE_PAD), ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END))}
  vision = dict(depth=3, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                initializer_range=0.1, **VISION[family])
  text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.1,
              rope_parameters=dict(rope_type="default", rope_theta=500.0, mrope_section=[2, 3, 3]),
              bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
              tie_word_embeddings=tie)
  config_class, model_class = FAMILIES[family]
  config = config_class(vision_config=vision, text_config=text, video_token_id=len(tokenizer) - 1,
                        tie_word_embeddings=tie, **ids)
  torch.manual_seed(0)
  model = model_class(config).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  model.generation_config.eos_token_id = [tokenizer.eos_token_id]
  model.generation_config.pad_token_id = tokenizer.pad_token_id
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(tie) -> (directory, torch model), written once per module."""
  written = {}

  def get(tie: bool = False):
    if tie not in written:
      directory = str(tmp_path_factory.mktemp("qwen2_5_vl_tied" if tie else "qwen2_5_vl"))
      written[tie] = directory, _write(directory, tie)
    return written[tie]

  return get


def _their_inputs(directory: str, texts: list[str], images: list[np.ndarray] | None) -> dict:
  """What Qwen2_5_VLProcessor gives the model (its constructor needs torchvision for the video processor, which this
  environment lacks, so its steps are taken here): the image processor's outputs, each image's `<|image_pad|>`
  repeated grid.prod() // merge² times, the tokenizer's ids (several texts padded on the right) and the image-token
  types `get_rope_index` reads."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  inputs = dict(_their_image_processor()(images, return_tensors="pt")) if images else {}
  grids = iter(inputs.get("image_grid_thw", []))
  expanded = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * int(next(grids).prod() // MERGE**2), text)
              for text in texts]
  inputs.update(tokenizer(expanded, return_tensors="pt", padding=True))
  inputs["mm_token_type_ids"] = (inputs["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).int()
  return inputs


def test_processor_patches_and_token_counts_match_transformers(checkpoint):
  directory, _ = checkpoint()
  ours = ImageProcessor.from_directory(directory)
  assert isinstance(ours, QwenImageProcessor) and ours.size == {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
  config = VLMConfig.from_dict(hf.read_config(directory).config.model)
  images = images_of(SIZES + [(8, 8), (6, 150), (2000, 30)])
  theirs = _their_image_processor()(images, return_tensors="np")
  first = 0
  for i, (patches, grid) in enumerate(ours(images)):
    assert grid == tuple(theirs["image_grid_thw"][i])
    np.testing.assert_array_equal(patches, theirs["pixel_values"][first:first + len(patches)])
    first += len(patches)
    expanded = _their_inputs(directory, [f"{VISION_START}{IMAGE_PAD}{VISION_END} hi"], images[i:i + 1])["input_ids"]
    assert qwen_vl.image_token_count(config, grid) == int((expanded == config.image_token_id).sum())
  assert first == len(theirs["pixel_values"])
  height, width = ours.target_size(300, 200)  # above the budget: scaled down into it
  assert height * width <= MAX_PIXELS and height % 8 == width % 8 == 0
  height, width = ours.target_size(5, 9)  # below the minimum: scaled up to it
  assert height * width >= MIN_PIXELS


def test_the_vision_tower_matches_transformers(checkpoint):
  check_vision_tower(*checkpoint())


def check_vision_tower(directory: str, model) -> None:
  """The tower's merged tokens of images of every size in one batch equal transformers' `model.visual`'s."""
  pretrained = hf.load_pretrained(directory)
  config = VLMConfig.from_dict(pretrained.config.model)
  processed = pretrained.image_processor(images_of(SIZES))
  patches = qwen_vl.batch_patches(config, [processed])
  with jax.default_matmul_precision("highest"):
    table = QwenViT(config.vision).apply({"params": pretrained.params["vision"]}, patches.pixel_values,
                                         patches.patch_positions, patches.image_ids)
  ours = np.asarray(table)[patches.token_index[0]]
  counts = [qwen_vl.image_token_count(config, grid) for _, grid in processed]
  ours = ours[:sum(counts)]
  with torch.no_grad():
    theirs = model.model.visual(torch.from_numpy(np.concatenate([p for p, _ in processed])),
                                grid_thw=torch.tensor([grid for _, grid in processed])).pooler_output.numpy()
  print(f"vision tower: max relative error {max_relative_error(ours, theirs):.2e}")
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_for_each_size_and_a_mixed_batch(checkpoint, tie):
  directory, model = checkpoint(tie)
  vlm = vlmjax.load(directory)
  assert vlm.model_config.decoder.tie_embeddings == tie
  print(f"tie={tie}: max relative logit error per image size {check_logits(vlm, model, directory)}")


def check_logits(vlm, model, directory: str) -> dict[str, str]:
  """The logits of one padded batch, each row its own image size (above the pixel budget and below the minimum too),
  two images or none, equal transformers' row by row; returns the largest relative error per row's image sizes."""
  # Rows: one image of each size (its own aspect ratio and token count), one with two images, one with text only.
  images_per_row = [[image] for image in images_of(SIZES)] + [images_of([(30, 70), (52, 37)], seed=1), []]
  prompts = PROMPTS + ["Compare them.", "No picture here."]
  rows, patches, texts = chat_rows(vlm, images_per_row, prompts)
  ids, _ = padded(vlm, rows)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(vlm.logits(ids, patches))
  errors = {}
  for i, (row, row_images) in enumerate(zip(rows, images_per_row)):
    inputs = _their_inputs(directory, [texts[i]], row_images or None)
    assert inputs["input_ids"][0].tolist() == row  # the same prompt, placeholders expanded alike
    with torch.no_grad():
      theirs = model(**inputs).logits[0].numpy()
    errors[str([image.shape[:2] for image in row_images])] = f"{max_relative_error(ours[i, :len(row)], theirs):.1e}"
    np.testing.assert_allclose(ours[i, :len(row)], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  return errors


def test_generate_matches_transformers_greedy_tokens_with_images_of_different_sizes(checkpoint):
  directory, model = checkpoint()
  assert_greedy_matches_transformers(vlmjax.load(directory), model, directory, _their_inputs,
                                     images_of(SIZES[:4], seed=2), PROMPTS[:4])


def test_generate_command(checkpoint, tmp_path):
  directory, _ = checkpoint()
  assert_generate_command_matches(directory, tmp_path, PROMPTS[0])


def test_images_of_new_sizes_reuse_the_compiled_program(checkpoint):
  directory, _ = checkpoint()
  assert_new_sizes_reuse_prefill(vlmjax.load(directory), [(37, 52), (61, 29)], [(40, 40), (29, 61)])


def test_host_mrope_positions_equal_the_programs(checkpoint):
  """The serving engine's M-RoPE positions, made on the host from a prompt's ids and its images' grids, are those the
  model computes from the batch's tables (`mrope_positions`), for padded rows of images of every size, two images
  and none; a placeholder past the images' tokens (generated, then prefilled again) counts as text."""
  directory, _ = checkpoint()
  vlm = vlmjax.load(directory)
  config = vlm.model_config
  images_per_row = [[image] for image in images_of(SIZES)] + [images_of([(30, 70), (52, 37)], seed=1), []]
  rows, patches, _ = chat_rows(vlm, images_per_row, PROMPTS + ["Compare them.", "No picture here."])
  ids, mask = padded(vlm, rows)
  positions, offsets = mrope_positions(ids, config.image_token_id, patches, mask)
  for b, (row, row_images) in enumerate(zip(rows, images_per_row)):
    grids = [grid for _, grid in vlm.image_processor(row_images)]
    ours, offset = host_mrope_positions(row, config.image_token_id, grids, config.vision)
    np.testing.assert_array_equal(ours, np.asarray(positions)[:, b, :len(row)])
    assert offset == int(offsets[b]) and (offset != 0) == bool(row_images), (b, offset)
    more, more_offset = host_mrope_positions(row + [config.image_token_id, 7], config.image_token_id, grids,
                                             config.vision)
    np.testing.assert_array_equal(more[:, len(row):], np.full((3, 2), len(row) + offset) + [0, 1])
    assert more_offset == offset


# The config.json keys that define the model (as transformers reads them), by family: the rest are training settings
# (initializer_range), video's (tokens_per_second, video_token_id) or the vision markers the processor places.
VISION_KEYS = {"qwen2_5_vl": ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                              "temporal_patch_size", "spatial_merge_size", "window_size", "fullatt_block_indexes",
                              "out_hidden_size", "hidden_act", "rope_parameters"),
               "qwen2_vl": ("depth", "embed_dim", "hidden_size", "mlp_ratio", "num_heads", "in_channels", "patch_size",
                            "temporal_patch_size", "spatial_merge_size", "hidden_act", "rope_parameters")}
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings", "use_sliding_window",
             "layer_types", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_the_same_logits(checkpoint, tie, tmp_path):
  """`vlmjax export`'s function on the imported checkpoint: transformers loads the directory with every tensor in
  place and gives the original's logits for a padded batch of two image sizes; its config and processor are the
  original's, and vlmjax reads it back into the same parameters."""
  directory, model = checkpoint(tie)
  print(f"tie={tie}: export's max relative logit error {check_export(directory, model, str(tmp_path / 'export')):.1e}")


def check_export(directory: str, model, out: str, family: str = "qwen2_5_vl") -> float:
  """`vlmjax export` of the checkpoint into `out` loads in transformers with the original's logits (returns their
  largest relative error), config keys and processor, and reads back into the same parameters."""
  assert "as a Hugging Face directory" in cli.export_checkpoint(directory, out)
  reloaded, info = FAMILIES[family][1].from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
  images = images_of([(37, 52), (61, 29)])
  texts = [f"{VISION_START}{IMAGE_PAD}{VISION_END} {prompt}" for prompt in PROMPTS[:2]]
  inputs = _their_inputs(directory, texts, images)
  lengths = inputs["attention_mask"].sum(1).tolist()
  assert lengths[0] != lengths[1], lengths  # one row padded
  with torch.no_grad():
    ours, theirs = (m(**inputs).logits.numpy() for m in (reloaded.eval(), model))
  real = inputs["attention_mask"].numpy().astype(bool)
  error = max_relative_error(ours[real], theirs[real])
  assert error <= 1e-5

  with open(os.path.join(directory, "config.json")) as f:
    original = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  for key in ("architectures", "model_type", "image_token_id", "tie_word_embeddings"):
    assert exported[key] == original[key], key
  theirs_config, ours_config = model.config, reloaded.config
  for key in VISION_KEYS[family]:
    assert getattr(ours_config.vision_config, key) == getattr(theirs_config.vision_config, key), key
  for key in TEXT_KEYS:
    assert getattr(ours_config.text_config, key) == getattr(theirs_config.text_config, key), key
  for key in ("rope_type", "rope_theta", "mrope_section"):  # written as rope_theta + rope_scaling, read alike
    assert ours_config.text_config.rope_parameters[key] == theirs_config.text_config.rope_parameters[key], key

  again, pretrained = hf.load_pretrained(out), hf.load_pretrained(directory)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, pretrained.params)
  assert again.config.model == pretrained.config.model and again.image_processor == pretrained.image_processor
  assert (again.eos_token_ids, again.pad_token_id) == (pretrained.eos_token_ids, pretrained.pad_token_id)
  their_processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
  np.testing.assert_array_equal(their_processor(images, return_tensors="np")["pixel_values"],
                                _their_image_processor()(images, return_tensors="np")["pixel_values"])
  their_tokenizer, original_tokenizer = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, directory))
  assert their_tokenizer(texts)["input_ids"] == original_tokenizer(texts)["input_ids"]
  assert their_tokenizer.chat_template == original_tokenizer.chat_template == CHAT_TEMPLATE
  return error


# --- what vlmjax refuses, with the key and value named ----------------------------------------------------------

def _config(text=None, **changes) -> dict:
  values = transformers.Qwen2_5_VLConfig().to_dict()
  values["text_config"].update(text or {})
  return {**values, **changes}


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="qwen3_vl"), "model_type='qwen3_vl' is not supported"),
    (dict(text=dict(use_sliding_window=True)), "text_config.use_sliding_window=True is not supported"),
    (dict(text=dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e6, mrope_section=[16, 24, 24]))),
     "text_config.rope_parameters=.*yarn.* is not supported"),
    (dict(text=dict(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 20]))),
     r"mrope_section=\[16, 24, 20\] must sum to half the head size \(64\)"),
    (dict(vision_config=dict(transformers.Qwen2_5_VLConfig().vision_config.to_dict(), hidden_act="relu")),
     "vision_config.hidden_act='relu' is not supported"),
])
def test_unsupported_values_are_named(changes, message):
  with pytest.raises(ValueError, match=message):
    hf_config.from_hf(_config(**changes))


def test_missing_keys_take_the_transformers_defaults():
  ours = hf_config.from_hf({"model_type": "qwen2_5_vl"}).config.model
  assert ours == hf_config.from_hf(transformers.Qwen2_5_VLConfig().to_dict()).config.model
  assert ours.decoder.mrope_section == [16, 24, 24] and ours.vision.fullatt_block_indexes == [7, 15, 23, 31]
  ours = ImageProcessor.from_dict({"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 100_000})
  theirs = transformers.Qwen2VLImageProcessorPil(max_pixels=100_000)
  for image in images_of([(300, 500), (700, 260), (20, 30)]):
    expected = theirs([image], return_tensors="np")
    (patches, grid), = ours([image])
    assert grid == tuple(expected["image_grid_thw"][0])
    np.testing.assert_array_equal(patches, expected["pixel_values"])


@pytest.mark.parametrize("changes,message", [
    (dict(qkv_bias=False), r"model\.decoder\.qkv_bias=False cannot be written as a Hugging Face qwen2_5_vl"),
    (dict(head_dim=8, mrope_section=[1, 1, 2]), r"model\.decoder\.head_dim=8 cannot be written .* heads are "
                                                r"decoder.width // decoder.num_heads = 16 wide"),
    (dict(mrope_section=[]), r"model\.decoder\.mrope_section=\(\) cannot be written as a Hugging Face qwen2_5_vl"),
])
def test_export_refuses_what_qwen2_5_vl_cannot_express(checkpoint, tmp_path, changes, message):
  directory, _ = checkpoint()
  config = hf.read_config(directory).config
  config.model.decoder.update(changes)
  with pytest.raises(ValueError, match=message):
    hf.save_pretrained(str(tmp_path), config, params=None)
