"""LLaVA-NeXT (anyres) against transformers: tiny random checkpoints written by transformers (Llama and Mistral
text models), the image processor's tiles and token counts, logits for images of several sizes and aspect ratios
alone and mixed in a batch, greedy generation through `vlmjax.load` and `vlmjax generate`, export, and the errors
for what vlmjax cannot run."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

import vlmjax
from conftest import IMAGE_TOKEN, Case, train_tokenizer
from test_hf import max_relative_error
from variable_tokens import (assert_generate_command_matches, assert_greedy_matches_transformers,
                             assert_new_sizes_reuse_prefill, chat_rows, images_of, padded)
from vlmjax.data.images import AnyresImageProcessor, ImageProcessor
from vlmjax.interop import hf, hf_config
from vlmjax.models import anyres
from vlmjax.models.vlm import VLMConfig

TILE = 24  # the tower's input side; patch 6: 4 x 4 = 16 tokens a tile
PINPOINTS = [[24, 48], [48, 24], [48, 48], [24, 72], [72, 24]]
# (height, width): landscape, portrait, square, very wide, very tall; the chosen pinpoint and unpadding differ.
SIZES = [(37, 52), (61, 29), (45, 45), (20, 90), (83, 17)]
BACKBONES = {
    "llama": Case("llava_next_llama", "llava", vocab_size=131),
    "mistral": Case("llava_next_mistral", "llava", vocab_size=127, num_kv_heads=1, head_dim=16),
}
PROMPTS = ["What is in the picture?", "Describe the image in detail, please.", "caption en",
           "How many shapes are there?", "The quick brown fox?"]



def _their_processor(tokenizer=None):
  image_processor = transformers.LlavaNextImageProcessorPil(
      size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
  if tokenizer is None:
    return image_processor
  return transformers.LlavaNextProcessor(image_processor, tokenizer, patch_size=6,
                                         vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _write(case: Case, backbone: str, directory: str):
  """The tokenizer, image processor and a LlavaNextForConditionalGeneration with every weight perturbed."""
  tokenizer = train_tokenizer(case, directory)
  image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
  _their_processor().save_pretrained(directory)
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=TILE, patch_size=6, initializer_range=0.1)
  text = dict(vocab_size=case.vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=case.num_heads, num_key_value_heads=case.num_kv_heads, head_dim=case.head_dim,
              initializer_range=0.1, rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=500.0),
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
  text_config = (transformers.MistralConfig(**text, sliding_window=None) if backbone == "mistral"
                 else transformers.LlamaConfig(**text))
  config = transformers.LlavaNextConfig(vision_config=vision, text_config=text_config, image_token_index=image_token_id,
                                        image_grid_pinpoints=PINPOINTS, image_seq_length=16)
  torch.manual_seed(0)
  model = transformers.LlavaNextForConditionalGeneration(config).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  model.generation_config.eos_token_id = [tokenizer.eos_token_id, image_token_id - 1]
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(backbone) -> (directory, torch model), written once per module."""
  written = {}

  def get(backbone: str):
    if backbone not in written:
      directory = str(tmp_path_factory.mktemp(BACKBONES[backbone].name))
      written[backbone] = directory, _write(BACKBONES[backbone], backbone, directory)
    return written[backbone]

  return get


def _their_inputs(directory: str, texts: list[str], images: list[np.ndarray]) -> dict:
  """LlavaNextProcessor's inputs; the texts are rendered chat templates, which write the BOS themselves."""
  processor = _their_processor(transformers.AutoTokenizer.from_pretrained(directory))
  return processor(images=images, text=texts, add_special_tokens=False, return_tensors="pt")


def test_processor_tiles_and_token_counts_match_transformers(checkpoint):
  directory, _ = checkpoint("llama")
  ours = ImageProcessor.from_directory(directory)
  assert isinstance(ours, AnyresImageProcessor) and ours.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
  config = VLMConfig.from_dict(hf.load_pretrained(directory).config.model)
  images = images_of(SIZES + [(24, 24), (7, 300), (300, 7), (48, 48)])
  theirs = _their_processor()(images, return_tensors="np")
  for i, (tiles, size) in enumerate(ours(images)):
    assert size == tuple(theirs["image_sizes"][i])
    np.testing.assert_allclose(tiles, theirs["pixel_values"][i, :len(tiles)].transpose(0, 2, 3, 1), atol=1e-6, rtol=0)
    assert not theirs["pixel_values"][i, len(tiles):].any()  # transformers' batch padding
    expanded = _their_inputs(directory, [f"{IMAGE_TOKEN} hi"], images[i:i + 1])["input_ids"][0]
    assert anyres.image_token_count(config, size) == int((expanded == config.image_token_id).sum())


def test_processor_keys_left_out_take_the_class_defaults():
  ours = ImageProcessor.from_dict({"image_processor_type": "LlavaNextImageProcessor"})
  theirs = transformers.LlavaNextImageProcessorPil()
  images = images_of([(300, 500), (700, 260), (224, 224)])
  expected = theirs(images, return_tensors="np")
  for i, (tiles, size) in enumerate(ours(images)):
    assert size == tuple(expected["image_sizes"][i])
    np.testing.assert_allclose(tiles, expected["pixel_values"][i, :len(tiles)].transpose(0, 2, 3, 1), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_logits_match_transformers_for_each_size_and_a_mixed_batch(checkpoint, backbone):
  directory, model = checkpoint(backbone)
  vlm = vlmjax.load(directory)
  # Rows: one image of each size (their own aspect ratios and pinpoints), then one row with two images.
  images_per_row = [[image] for image in images_of(SIZES)] + [images_of([(30, 70), (52, 37)], seed=1)]
  prompts = PROMPTS + ["Compare them."]
  rows, tiles, texts = chat_rows(vlm, images_per_row, prompts)
  assert len({len(row) for row in rows}) == len(rows)  # every row its own token count
  ids, _ = padded(vlm, rows)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(vlm.logits(ids, tiles))
  errors = {}
  for i, (row, row_images) in enumerate(zip(rows, images_per_row)):
    inputs = _their_inputs(directory, [texts[i]], row_images)
    assert inputs["input_ids"][0].tolist() == row  # the same prompt, placeholders expanded alike
    with torch.no_grad():
      theirs = model(**inputs).logits[0].numpy()
    errors[str([image.shape[:2] for image in row_images])] = max_relative_error(ours[i, :len(row)], theirs)
    np.testing.assert_allclose(ours[i, :len(row)], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  print(f"{backbone}: max relative logit error per image size {errors}")


def test_generate_matches_transformers_greedy_tokens_with_images_of_different_sizes(checkpoint):
  directory, model = checkpoint("llama")
  assert_greedy_matches_transformers(vlmjax.load(directory), model, directory, _their_inputs,
                                     images_of(SIZES[:4], seed=2), PROMPTS[:4])


def test_generate_command(checkpoint, tmp_path):
  directory, _ = checkpoint("llama")
  assert_generate_command_matches(directory, tmp_path, PROMPTS[0])


def test_export_loads_in_transformers_with_the_same_logits(checkpoint, tmp_path):
  directory, model = checkpoint("mistral")
  pretrained = hf.load_pretrained(directory)
  out = str(tmp_path / "export")
  hf.save_pretrained(out, pretrained.config, pretrained.params, pretrained.tokenizer, pretrained.image_processor,
                     eos_token_ids=pretrained.eos_token_ids, pad_token_id=pretrained.pad_token_id,
                     max_len=pretrained.max_len)
  reloaded, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  inputs = _their_inputs(directory, [f"USER: {IMAGE_TOKEN}\nhi ASSISTANT:"], images_of([(37, 52)]))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded.eval()(**inputs).logits.numpy(), model(**inputs).logits.numpy())
  again = hf.load_pretrained(out)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, pretrained.params)
  assert again.image_processor == pretrained.image_processor
  their_processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
  assert type(their_processor).__name__ == "LlavaNextImageProcessorPil"
  assert their_processor.image_grid_pinpoints == PINPOINTS


# --- what vlmjax refuses, with the key and value named ----------------------------------------------------------

def _config(**changes) -> dict:
  values = transformers.LlavaNextConfig(vision_config=transformers.CLIPVisionConfig(image_size=336, patch_size=14),
                                        text_config=transformers.MistralConfig(sliding_window=None)).to_dict()
  return {**values, **changes}


@pytest.mark.parametrize("changes,message", [
    (dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy='full' is not supported for "
                                                  "llava_next"),
    (dict(image_grid_pinpoints=[[336, 672], [500, 336]]), r"image_grid_pinpoints has \[500, 336\], not a \[height, "
                                                          r"width\] of positive multiples of vision_config.image_size"
                                                          r"=336"),
    (dict(image_grid_pinpoints=[[336, 672, 3]]), r"image_grid_pinpoints has \[336, 672, 3\]"),
    (dict(model_type="llava_onevision"), "model_type='llava_onevision' is not supported"),
])
def test_unsupported_values_are_named(changes, message):
  with pytest.raises(ValueError, match=message):
    hf_config.from_hf(_config(**changes))


def test_a_sliding_window_is_named():
  values = _config()
  values["text_config"]["sliding_window"] = 4096
  with pytest.raises(ValueError, match="text_config.sliding_window=4096 is not supported"):
    hf_config.from_hf(values)
  del values["text_config"]["sliding_window"]  # MistralConfig's default: 4096
  with pytest.raises(ValueError, match="text_config.sliding_window=4096"):
    hf_config.from_hf(values)


def test_missing_keys_take_the_transformers_defaults():
  ours = hf_config.from_hf({"model_type": "llava_next"}).config.model
  assert ours == hf_config.from_hf(transformers.LlavaNextConfig().to_dict()).config.model
  assert ours.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
  mistral = hf_config.from_hf({"model_type": "llava_next", "text_config": {"model_type": "mistral",
                                                                           "sliding_window": None}})
  full = transformers.LlavaNextConfig(text_config=transformers.MistralConfig(sliding_window=None)).to_dict()
  assert mistral.config.model == hf_config.from_hf(full).config.model


def test_a_processor_that_tiles_otherwise_than_the_model_is_named(checkpoint, tmp_path):
  directory, _ = checkpoint("llama")
  copy = str(tmp_path / "copy")
  shutil.copytree(directory, copy)
  path = os.path.join(copy, "preprocessor_config.json")
  with open(path) as f:
    values = json.load(f)
  with open(path, "w") as f:
    json.dump({**values, "image_grid_pinpoints": [[24, 48]]}, f)
  with pytest.raises(ValueError, match=r"tiles images at \(\(24, 48\),\) .* image_grid_pinpoints=\(\(24, 48\), "):
    hf.load_pretrained(copy)


def test_images_of_new_sizes_reuse_the_compiled_program(checkpoint):
  directory, _ = checkpoint("llama")
  assert_new_sizes_reuse_prefill(vlmjax.load(directory), [(37, 52), (61, 29)], [(45, 45), (29, 61)])


def test_batch_tiles_lays_out_rows_with_several_images_or_none(checkpoint):
  directory, _ = checkpoint("llama")
  vlm = vlmjax.load(directory)
  config = vlm.model_config
  processed = vlm.image_processor(images_of([(37, 52), (61, 29), (20, 90)]))
  tiles = anyres.batch_tiles(config, [processed[:2], [], processed[2:]])
  num_tiles = [len(image_tiles) for image_tiles, _ in processed]
  counts = [anyres.image_token_count(config, size) for _, size in processed]
  assert tiles.pixel_values.shape == (anyres.bucket(sum(num_tiles)), TILE, TILE, 3)
  assert tiles.token_index.shape == (3, anyres.bucket(counts[0] + counts[1]))
  np.testing.assert_array_equal(tiles.pixel_values[:sum(num_tiles)], np.concatenate([t for t, _ in processed]))
  assert not tiles.pixel_values[sum(num_tiles):].any()
  newline = len(tiles.pixel_values) * 16
  row = tiles.token_index[0]
  np.testing.assert_array_equal(row[:16], np.arange(16))  # the first image's base tile
  assert (row[:counts[0]] == newline).sum() == anyres.image_grid(config, processed[0][1]).height
  np.testing.assert_array_equal(row[counts[0]:counts[0] + 16], num_tiles[0] * 16 + np.arange(16))
  assert not tiles.token_index[1].any()  # a row without images reads nothing
  np.testing.assert_array_equal(tiles.token_index[2, :16], (num_tiles[0] + num_tiles[1]) * 16 + np.arange(16))
  with pytest.raises(ValueError, match="tiles and up to"):
    anyres.batch_tiles(config, [processed], num_tiles=2)
