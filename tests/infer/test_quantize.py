"""Loading in half precision and low-bit weights, and the INT8 KV cache, on the tiny model: logits against float32
within stated bounds, parameter bytes measured on the loaded arrays, the engine's greedy tokens with an INT8 pool
equal to `generate_ids` with an INT8 cache, quantized checkpoints written and read back, and the errors."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

import vlmjax
from vlmjax.infer import paged, quantize
from vlmjax.infer.engine import Engine
from vlmjax.models import quant
from vlmjax.models.vlm import VLM as VLMModel
from vlmjax.models.vlm import VLMConfig


def _with(vlm, **settings):
  config, params = quantize.apply(vlm.config, vlm.params, quantize.Settings.parse(**settings))
  return dataclasses.replace(vlm, config=config, params=params)


def _relative(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def inputs(tiny_vlm):
  return tiny_vlm.model_config.example_inputs(2, seed=0)


@pytest.fixture(scope="module")
def float_logits(tiny_vlm, inputs):
  return np.asarray(tiny_vlm.logits(inputs["input_ids"], inputs["pixel_values"]))


# Relative error (Frobenius) of the logits against float32 on the tiny model (width 32, weights x3). The tiny
# model's 32-input layers are what int4 suits least: 7 levels over groups of 16 inputs.
BOUNDS = {"int8": 0.06, "w8a8": 0.08, "int4:16": 0.8}


@pytest.mark.parametrize("spec", list(BOUNDS))
def test_quantized_logits_stay_within_the_schemes_bound_of_float32(tiny_vlm, inputs, float_logits, spec):
  quantized = _with(tiny_vlm, quantize=spec)
  logits = quantized.logits(inputs["input_ids"], inputs["pixel_values"])
  assert _relative(logits, float_logits) < BOUNDS[spec]


@pytest.mark.parametrize("spec,bound", [("int8", 3e-3), ("int4:16", 3e-3), ("w8a8", 0.05)])
def test_a_quantized_model_computes_what_the_float_model_of_its_dequantized_weights_computes(tiny_vlm, inputs, spec,
                                                                                            bound):
  """The error is the weights' rounding alone for weight-only schemes (the CPU's int8 matmuls keep 16-bit
  activations), plus the activations' for W8A8."""
  quantized = _with(tiny_vlm, quantize=spec)
  dequantized = jax.tree.map(lambda leaf: quant.dequantize(leaf) if isinstance(leaf, quant.QuantizedKernel) else leaf,
                             quantized.params, is_leaf=lambda leaf: isinstance(leaf, quant.QuantizedKernel))
  reference = dataclasses.replace(tiny_vlm, params=dequantized).logits(inputs["input_ids"], inputs["pixel_values"])
  assert _relative(quantized.logits(inputs["input_ids"], inputs["pixel_values"]), reference) < bound


def test_bfloat16_logits_stay_near_float32(tiny_vlm, inputs, float_logits):
  half = _with(tiny_vlm, dtype="bfloat16")
  assert half.model_config.decoder.dtype == "bfloat16"
  assert {leaf.dtype for leaf in jax.tree.leaves(half.params)} == {np.dtype("bfloat16")}
  assert _relative(half.logits(inputs["input_ids"], inputs["pixel_values"]), float_logits) < 0.1


def test_parameter_bytes_of_int8_and_int4_against_float32_measured_on_the_arrays():
  """A model wide enough (width 256) that per-channel scales cost what they cost in real models: INT8 <= 0.27x,
  INT4 in groups of 128 <= 0.15x of float32, scales and the float norms, biases and patch embedding included (a
  patch embedding of 4 x 4 pixels: in CLIP-L, as in the bench LLaVA, it is under 0.5% of the parameters)."""
  from configs import sizes

  model = {"vision": sizes.vit("Ti/16", "clip", image_size=16, patch_size=4, width=256, depth=2, num_heads=4,
                               mlp_dim=512),
           "decoder": sizes.lm("tiny", vocab_size=512, width=256, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=512),
           "image_token_id": 5}
  config = VLMConfig.from_dict(model)
  params = nn.meta.unbox(VLMModel(config).init(jax.random.key(0), **config.example_inputs(1)))["params"]
  from vlmjax.models import layers

  params = layers.unstack_layers(params)
  float_bytes = quantize.param_bytes(params)
  assert float_bytes == sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  ratios = {}
  for spec in ("int8", "int4"):
    settings = quantize.Settings.parse(quantize=spec, quantize_vision=True)
    quantized = quantize.quantize_params(params, settings.scheme, settings.group_size, vision=True)
    ratios[spec] = sum(leaf.nbytes for leaf in jax.tree.leaves(quantized)) / float_bytes
  assert ratios["int8"] <= 0.27 and ratios["int4"] <= 0.15, ratios


def test_the_engines_greedy_tokens_with_an_int8_pool_equal_generate_ids_with_an_int8_cache(tiny_vlm):
  vlm = _with(tiny_vlm, kv_cache_dtype="int8")
  engine = Engine(vlm, num_slots=2, max_len=64, num_pages=32, page_size=4).start()
  assert engine._state.cache.k[0].values.dtype == np.int8  # the pool holds int8 pages
  try:
    rng = np.random.default_rng(0)
    for question, seed in [("What colour is the circle?", 1), ("Describe the picture in detail.", 2)]:
      image = rng.integers(0, 256, (20, 24, 3), np.uint8)
      pixels = vlm.image_processor([image])
      ids = vlm.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], 1)
      served = engine.submit(ids, pixels, max_tokens=12).wait(120).token_ids
      alone = vlm.generate_ids(np.asarray([ids]), pixels[None], max_new_tokens=12)[0].tolist()
      ends = [i for i, token in enumerate(alone) if token in vlm.eos_token_ids]
      assert served == (alone[:ends[0] + 1] if ends else alone)
  finally:
    engine.stop()


def test_an_int8_pool_holds_more_tokens_in_the_bytes_of_the_float_one(tiny_vlm):
  """The default pool is the memory of a [slots, max_len] cache in the compute dtype (float32 here, head size 8):
  INT8 pages with a float32 scale per token and head take (8 + 4) / (4 * 8) of the bytes, so 2.67x the tokens."""
  pools = {}
  for kv_cache_dtype in (None, "int8"):
    engine = Engine(_with(tiny_vlm, kv_cache_dtype=kv_cache_dtype), num_slots=2, max_len=64, page_size=4)
    pools[kv_cache_dtype] = engine.pages.num_pages, paged.pool_bytes(engine.config, engine.pages.num_pages, 4)
    held = sum(leaf.nbytes for leaf in jax.tree.leaves((engine._state.cache.k, engine._state.cache.v)))
    assert held == pools[kv_cache_dtype][1]  # the pages' arrays as allocated
  assert pools[None][0] == 2 * 64 // 4  # every slot full
  assert pools["int8"][0] >= 1.9 * pools[None][0] and pools["int8"][1] <= pools[None][1]
  assert pools["int8"][0] == 2 * 64 // 4 * 32 // 12


def test_an_int8_cache_decodes_nearly_as_the_float_cache(tiny_vlm, inputs):
  float_tokens = tiny_vlm.generate_ids(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=4)
  int8_tokens = _with(tiny_vlm, kv_cache_dtype="int8").generate_ids(inputs["input_ids"], inputs["pixel_values"],
                                                                     max_new_tokens=4)
  np.testing.assert_array_equal(int8_tokens[:, :3], float_tokens[:, :3])


def test_a_quantized_checkpoint_is_written_once_and_read_back_as_it_was(tiny_vlm, inputs, tmp_path):
  quantized = _with(tiny_vlm, quantize="int4:16")
  out = str(tmp_path / "int4")
  quantize.save_checkpoint(out, quantized.config, quantized.params, quantized.tokenizer, quantized.image_processor,
                           quantized.eos_token_ids, quantized.pad_token_id, quantized.max_len, "tiny")
  loaded = vlmjax.load(out)
  kernels = [leaf for leaf in jax.tree.leaves(loaded.params, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
             if isinstance(leaf, quant.QuantizedKernel)]
  assert kernels and all(kernel.scheme == "int4" and kernel.group_size == 16 for kernel in kernels)
  assert quantize.param_bytes(loaded.params) == quantize.param_bytes(quantized.params)
  np.testing.assert_array_equal(loaded.logits(inputs["input_ids"], inputs["pixel_values"]),
                                quantized.logits(inputs["input_ids"], inputs["pixel_values"]))
  assert loaded.eos_token_ids == tiny_vlm.eos_token_ids
  assert vlmjax.load(out, quantize="int4:16", kv_cache_dtype="int8").model_config.decoder.kv_cache_dtype == "int8"
  with pytest.raises(ValueError, match=r"holds weights quantized with quantize=int4:16; it was loaded with "
                                       r"quantize=int8"):
    vlmjax.load(out, quantize="int8")


def test_unknown_settings_are_refused_with_what_to_choose(tiny_vlm):
  with pytest.raises(ValueError, match=r"unknown quantization scheme 'int2'"):
    quantize.Settings.parse(quantize="int2")
  with pytest.raises(ValueError, match=r"unknown dtype 'float16'"):
    quantize.Settings.parse(dtype="float16")
  with pytest.raises(ValueError, match=r"unknown kv_cache_dtype 'fp8'"):
    quantize.Settings.parse(kv_cache_dtype="fp8")
  with pytest.raises(ValueError, match=r"only int4 takes a group size"):
    quantize.Settings.parse(quantize="int8:64")
  # The tiny model's layers have 32 and 64 inputs: groups of 128 cannot split them, and the error names the layer.
  with pytest.raises(ValueError, match=r"decoder/embedding: int4 groups of 128 inputs cannot split .* 32 inputs"):
    _with(tiny_vlm, quantize="int4")


def test_vlmjax_quantize_writes_a_checkpoint_that_generate_reads_and_refuses_other_settings(tiny_vlm, tmp_path):
  import subprocess
  import sys

  import PIL.Image

  source, out = str(tmp_path / "float"), str(tmp_path / "int8")
  quantize.save_checkpoint(source, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                           tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, tiny_vlm.max_len, "tiny")
  image = str(tmp_path / "image.png")
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)).save(image)
  run = lambda *args: subprocess.run([sys.executable, "-m", "vlmjax.cli", *args], capture_output=True, text=True,
                                     timeout=300)
  made = run("quantize", source, out, "--quantize", "int8", "--quantize_vision")
  assert made.returncode == 0, made.stderr
  assert "quantize=int8, quantize_vision" in made.stdout
  answered = run("generate", "--checkpoint", out, "--image", image, "--prompt", "What colour is the circle?",
                 "--kv_cache_dtype", "int8", "--max_new_tokens", "4")
  assert answered.returncode == 0, answered.stderr
  expected = vlmjax.load(source, quantize="int8", quantize_vision=True, kv_cache_dtype="int8").generate(
      [PIL.Image.open(image)], ["What colour is the circle?"], max_new_tokens=4)[0]
  assert answered.stdout.strip() == expected.strip()
  refused = run("generate", "--checkpoint", out, "--image", image, "--prompt", "Hi", "--quantize", "w8a8")
  assert refused.returncode != 0 and "holds weights quantized with quantize=int8, quantize_vision" in refused.stderr
  unknown = run("generate", "--checkpoint", out, "--image", image, "--prompt", "Hi", "--quantize", "int3")
  assert unknown.returncode != 0 and "unknown quantization scheme 'int3'" in unknown.stderr


def test_quantized_weights_are_not_written_as_a_hugging_face_checkpoint(tiny_vlm, tmp_path):
  from vlmjax.interop import hf

  quantized = _with(tiny_vlm, quantize="int8")
  with pytest.raises(ValueError, match=r"these weights are quantized \(int8\); a Hugging Face checkpoint is written "
                                       r"from float weights"):
    hf.save_pretrained(str(tmp_path / "hf"), quantized.config, quantized.params)
