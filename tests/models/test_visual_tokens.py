"""Fewer visual tokens without retraining (`visual_tokens.py`): what each method keeps, the model's numbers with
every token kept, cached decoding and the engine against a full recomputation of the reduced sequence."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlmjax.api import VLM
from vlmjax.infer.engine import Engine
from vlmjax.models import visual_tokens
from vlmjax.models.vlm import VLM as VLMModel
from vlmjax.models.vlm import VLMConfig

METHODS = {"visionzip": "visionzip:6", "tome": "tome:5", "pool": "pool:4"}
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]


@pytest.fixture(scope="module")
def vlm16(tiny_vlm):
  """tiny_vlm's model with 32-pixel images: 16 patch tokens per image (a 4 x 4 grid) and a CLIP class token."""
  model = tiny_vlm.config.model.to_dict()
  model["vision"]["image_size"] = 32
  config = VLMConfig.from_dict(model)
  params = nn.meta.unbox(VLMModel(config).init(jax.random.key(2), **config.example_inputs(1)))["params"]
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
  processor = type(tiny_vlm.image_processor)(size={"height": 32, "width": 32})
  return VLM(config=ml_collections.ConfigDict({"model": model}), params=params, tokenizer=tiny_vlm.tokenizer,
             image_processor=processor, eos_token_ids=tiny_vlm.eos_token_ids, pad_token_id=tiny_vlm.pad_token_id)


@pytest.fixture(scope="module")
def image():
  return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), np.uint8))


def _inputs(vlm, image):
  return np.array([vlm.prompt_ids(CONVERSATION, 1)]), vlm.image_processor([image])


def test_keeping_every_token_gives_the_unreduced_logits(vlm16, image):
  input_ids, pixel_values = _inputs(vlm16, image)
  full = vlm16.logits(input_ids, pixel_values)
  for spec in ("visionzip:16", "tome:1.0", "pool:16", "fastv:16:1"):
    reduced = vlm16.with_visual_tokens(spec)
    assert reduced.model_config.tokens_per_image == 16
    np.testing.assert_array_equal(reduced.logits(input_ids, pixel_values), full)


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_decoding_equals_a_full_recomputation_of_the_reduced_sequence(vlm16, image, method):
  vlm = vlm16.with_visual_tokens(METHODS[method])
  keep = visual_tokens.parse(METHODS[method]).tokens(16)
  input_ids, pixel_values = _inputs(vlm, image)
  assert vlm.model_config.tokens_per_image == keep
  assert (input_ids == vlm.model_config.image_token_id).sum() == keep
  generated = vlm.generate_ids(input_ids, pixel_values, max_new_tokens=6)[0].tolist()
  sequence = input_ids[0].tolist()
  for token in generated:  # greedy, each step a whole forward pass over the reduced sequence
    if token == vlm.pad_token_id and sequence[-1] in vlm.eos_token_ids:
      break
    assert token == int(np.argmax(vlm.logits(np.array([sequence]), pixel_values)[0, -1]))
    sequence.append(token)
  assert not np.array_equal(vlm.logits(input_ids, pixel_values)[0, -1],
                            vlm16.logits(*_inputs(vlm16, image))[0, -1])  # the reduction changed the answer's input


def test_fastv_decodes_as_a_full_recomputation_ranked_at_the_prompt_and_its_later_layers_hold_fewer_slots(vlm16,
                                                                                                          image):
  vlm = vlm16.with_visual_tokens("fastv:6:1")
  config = vlm.model_config
  input_ids, pixel_values = _inputs(vlm, image)
  assert config.tokens_per_image == 16 and (input_ids == config.image_token_id).sum() == 16  # all reach the LM
  generated = vlm.generate_ids(input_ids, pixel_values, max_new_tokens=6)[0].tolist()
  sequence, prompt_end = input_ids[0].tolist(), input_ids.shape[1] - 1
  forward = jax.jit(lambda ids: VLMModel(config).apply({"params": vlm.params}, ids, jnp.asarray(pixel_values),
                                                       rank_index=jnp.array([prompt_end]))[0])
  for token in generated:  # greedy, each step a forward pass over the whole sequence, ranked by the prompt's end
    if token == vlm.pad_token_id and sequence[-1] in vlm.eos_token_ids:
      break
    logits = forward(jnp.array([sequence]))
    assert logits.shape[1] == len(sequence) - 10  # layer 1 on: the prompt's 10 least attended image tokens gone
    assert token == int(np.argmax(logits[0, -1]))
    sequence.append(token)
  _, cache = VLMModel(config).apply({"params": vlm.params}, jnp.asarray(input_ids), jnp.asarray(pixel_values),
                                    cache=config.decoder.init_cache(1, input_ids.shape[1]))
  assert int(cache.lengths[0]) == input_ids.shape[1] and int(cache.pruned[0]) == 10
  assert not np.array_equal(vlm.logits(input_ids, pixel_values)[0, -1], vlm16.logits(input_ids, pixel_values)[0, -1])


def test_fastv_keeps_every_text_token_and_the_most_attended_image_tokens_in_order():
  from vlmjax.models import fastv
  received = jnp.array([[0.5, 0.1, 0.3, 0.05, 0.2, 0.9], [0.0, 0.4, 0.1, 0.2, 0.3, 0.0]])
  image_mask = jnp.array([[False, True, True, True, True, False], [False, True, True, True, True, False]])
  np.testing.assert_array_equal(fastv.kept_order(received, image_mask, 2), [[0, 2, 4, 5], [0, 1, 4, 5]])


def test_the_engine_and_its_prefix_cache_give_generate_ids_tokens_with_a_reduction(vlm16, image):
  vlm = vlm16.with_visual_tokens("visionzip:0.375")
  input_ids, pixel_values = _inputs(vlm, image)
  expected = vlm.generate_ids(input_ids, pixel_values, max_new_tokens=5)[0].tolist()
  engine = Engine(vlm, num_slots=2, max_len=64, page_size=4, prefix_caching=True).start()
  try:
    first, second = (engine.submit(input_ids[0], pixel_values, max_tokens=5).wait(120) for _ in range(2))
  finally:
    engine.stop()
  assert first.token_ids == second.token_ids == [t for t in expected if t != vlm.pad_token_id][:len(first.token_ids)]
  assert first.cached_tokens == 0 < second.cached_tokens  # a hit gives the miss's tokens


def test_fastv_in_the_engine_gives_generate_ids_tokens_whole_and_after_a_preemption(vlm16, image):
  vlm = vlm16.with_visual_tokens("fastv:0.25:1")
  input_ids, pixel_values = _inputs(vlm, image)
  expected = [t for t in vlm.generate_ids(input_ids, pixel_values, max_new_tokens=12)[0].tolist()
              if t != vlm.pad_token_id]
  # Pages of 4 tokens for two prompts and a page more: decoding runs the pool dry and preempts the second, which
  # is prefilled again with what it decoded (ranked by its prompt's last token, as before). The prefix cache is
  # on, and a prompt with images reads nothing from it.
  pages = 2 * -(-(input_ids.shape[1] + 1) // 4) + 1
  engine = Engine(vlm, num_slots=2, max_len=64, page_size=4, num_pages=pages, prefix_caching=True,
                  prefill_chunk=8).start()
  try:
    with engine._condition:  # held: both admitted at once
      requests = [engine.submit(input_ids[0], pixel_values, max_tokens=12) for _ in range(2)]
    outputs = [request.wait(120) for request in requests]
  finally:
    engine.stop()
  assert engine.num_preemptions > 0
  for output in outputs:
    assert output.token_ids == expected[:len(output.token_ids)] and len(output.token_ids) == len(expected)
    assert output.cached_tokens == 0


def test_what_each_method_keeps():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(2, 16, 4)), jnp.float32)
  received = jnp.asarray(rng.random((2, 16)), jnp.float32)
  pooled = visual_tokens.reduce(visual_tokens.parse("pool:4"), tokens, keys, received)
  np.testing.assert_allclose(pooled[:, 0], tokens.reshape(2, 4, 4, 8)[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
  zipped = visual_tokens.reduce(visual_tokens.parse("visionzip:8"), tokens, keys, received)
  dominant = np.sort(np.argsort(-np.asarray(received), axis=1)[:, :7], axis=1)  # 8 kept: 7 as they are, 1 merged
  np.testing.assert_array_equal(zipped[:, :7], np.take_along_axis(np.asarray(tokens), dominant[:, :, None], 1))
  others = [sorted(set(range(16)) - set(row)) for row in dominant]
  np.testing.assert_allclose(zipped[:, 7], [np.asarray(tokens)[i, rows].mean(0) for i, rows in enumerate(others)],
                             rtol=1e-5)  # one contextual token: the mean of all the rest
  merged = visual_tokens.reduce(visual_tokens.parse("tome:5"), tokens, keys, received)
  assert merged.shape == (2, 5, 8)


@pytest.mark.parametrize("spec, message", [
    ("visionzip:0", "positive count or a fraction"), ("visionzip:17", "keeps 17 of an image's 16 tokens"),
    ("zip:4", "METHOD one of visionzip, tome, pool"), ("visionzip:4:2", "expected METHOD:KEEP"),
    ("fastv:4:1:1", "or fastv:KEEP:LAYER"),
    ("pool:5", "square grid"), ("tome:x", "is not a number"), ("fastv:4:0", "LAYER '0' must be a layer number"),
    ("fastv:4:2", "prunes from layer 2, past the language model's last"), ("fastv:17:1", "keeps 17 of")])
def test_bad_settings_fail_before_anything_runs(vlm16, spec, message):
  with pytest.raises(ValueError, match=message):
    vlm16.with_visual_tokens(spec)


def test_the_command_line_refuses_a_keep_past_the_tokens(tiny_vlm, tmp_path):
  from vlmjax.interop import hf
  hf.save_pretrained(str(tmp_path / "tiny"), tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer,
                     tiny_vlm.image_processor, tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=64)
  Image.new("RGB", (16, 16)).save(tmp_path / "image.png")
  run = subprocess.run([sys.executable, "-m", "vlmjax.cli", "generate", "--checkpoint", str(tmp_path / "tiny"),
                        "--image", str(tmp_path / "image.png"), "--prompt", "Hi", "--visual_tokens", "tome:9"],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode != 0 and "vlmjax generate: visual_tokens keeps 9 of an image's 4 tokens" in run.stderr
  assert "Traceback" not in run.stderr
