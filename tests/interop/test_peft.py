"""LoRA export against transformers and peft: a tiny checkpoint (written by transformers) with random adapters and a
perturbed projector, no training. Our adapted model's logits (the module running its adapters, and the merged
kernels) equal transformers' of the merged export and peft's of the adapter export on the base (relative 1e-4).
LLaVA-1.5 and PaliGemma; LLaVA-NeXT, Qwen2.5-VL and Qwen2-VL (Qwen's patch merger as the projector) with images of
two sizes in one batch."""

import dataclasses
import functools
import importlib
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

# The other test modules' helpers (pytest puts tests/interop on sys.path: it has no __init__.py).
import test_llava_next
import test_qwen2_5_vl
from test_hf import PROMPTS, _prompt_ids, max_relative_error, random_images, their_logits
from test_hf_training import write_variable_checkpoint
from variable_tokens import chat_rows, images_of, padded
from configs import from_hf
import vlmjax
from vlmjax import cli, workdir as workdir_lib
from vlmjax.interop import hf
from vlmjax.interop import peft as peft_export
from vlmjax.models import lora
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.train import adapters, optim

TOLERANCE = 1e-4
# LLaVA with LoRA on every linear layer of its language model (LLaVA's recipe); PaliGemma on some of them, so that
# target_modules has to name exactly those.
CASES = {
    "llava_gqa": lora.LoraConfig(rank=4, alpha=6.0, dropout=0.05),
    "paligemma_mqa": lora.LoraConfig(rank=3, alpha=16.0, targets=r"attention/(query|value|out)$|mlp/down$"),
}


@functools.cache
def _forward(model_config: VLMConfig):
  return jax.jit(lambda params, ids, pixels, prefix: VLM(model_config).apply(
      {"params": params}, ids, pixels, prefix_lengths=prefix)[0])


def our_logits(model_config: VLMConfig, params, row: list[int], pixels: np.ndarray) -> np.ndarray:
  """float32[T, V] of one row (the whole prompt is the prefix of a prefix-LM)."""
  prefix = jnp.asarray([len(row)]) if model_config.prefix_lm else None
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward(model_config)(params, jnp.asarray([row]), jnp.asarray(pixels), prefix))[0]


def random_trained(pretrained: hf.Pretrained, lora_config: lora.LoraConfig, scale: float = 0.3) -> dict:
  """What a lora stage trains, made up: adapters of standard deviation `scale`, B non-zero (so that they change the
  logits), and the base's projector (Qwen's patch merger) perturbed; layers scanned, as pretrained.params."""
  model_config = adapters.adapted(VLMConfig.from_dict(pretrained.config.model), lora_config)
  boxed = jax.eval_shape(VLM(model_config).init, jax.random.key(0), **model_config.example_inputs(1))
  abstract, _ = lora.split(nn.meta.unbox(boxed)["params"])  # the adapters alone
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), abstract)
  projector, _ = optim.split_trained(pretrained.params, "lora")
  return lora.combine(trained, jax.tree.map(
      lambda x: x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), projector))


@dataclasses.dataclass(frozen=True)
class Adapted:
  """A tiny checkpoint with made-up adapters, and our logits of it."""

  case: object  # conftest.Case
  directory: str  # the base, a Hugging Face directory
  pretrained: hf.Pretrained
  lora_config: lora.LoraConfig
  trained: dict  # adapters and projector, layers scanned
  pixels: np.ndarray  # float32[1, H, W, 3]
  rows: list[list[int]]
  logits: list[np.ndarray]  # per row float32[T, V]: the module running its adapters

  @property
  def merged(self) -> dict:
    _, frozen = optim.split_trained(self.pretrained.params, "lora")
    return lora.merge(lora.combine(frozen, self.trained), self.lora_config)

  def their_logits(self, model) -> list[np.ndarray]:
    pixels = torch.tensor(self.pixels.transpose(0, 3, 1, 2))
    return [their_logits(model, self.case.kind, row, pixels) for row in self.rows]


@pytest.fixture(scope="module", params=list(CASES))
def adapted(request, checkpoint) -> Adapted:
  case, directory, _ = checkpoint(request.param)
  pretrained = hf.load_pretrained(directory)
  lora_config = CASES[request.param]
  trained = random_trained(pretrained, lora_config)
  _, base = optim.split_trained(pretrained.params, "lora")
  model_config = adapters.adapted(VLMConfig.from_dict(pretrained.config.model), lora_config)
  pixels = pretrained.image_processor(random_images(1, seed=2))
  rows = [_prompt_ids(pretrained, prompt) for prompt in PROMPTS[:2]]
  logits = [our_logits(model_config, lora.combine(base, trained), row, pixels) for row in rows]
  return Adapted(case, directory, pretrained, lora_config, trained, pixels, rows, logits)


def _model_class(kind: str):
  return (transformers.LlavaForConditionalGeneration if kind == "llava"
          else transformers.PaliGemmaForConditionalGeneration)


def _compare(name: str, ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
  errors = [max_relative_error(a, b) for a, b in zip(ours, theirs)]
  print(f"{name}: max relative logit error {max(errors):.2e}")
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * np.abs(b).max())


def test_the_adapters_change_the_logits_and_merging_keeps_them(adapted):
  model_config = VLMConfig.from_dict(adapted.pretrained.config.model)
  base_logits = our_logits(model_config, adapted.pretrained.params, adapted.rows[0], adapted.pixels)
  assert max_relative_error(base_logits, adapted.logits[0]) > 100 * TOLERANCE  # the export has something to get right
  _compare(f"{adapted.case.name} merged kernels",
           [our_logits(model_config, adapted.merged, row, adapted.pixels) for row in adapted.rows], adapted.logits)


def test_merged_export_loads_in_transformers_with_our_logits(adapted, tmp_path):
  pretrained, out = adapted.pretrained, str(tmp_path / "merged")
  hf.save_pretrained(out, pretrained.config, adapted.merged, pretrained.tokenizer, pretrained.image_processor,
                     eos_token_ids=pretrained.eos_token_ids, pad_token_id=pretrained.pad_token_id,
                     max_len=pretrained.max_len)
  reloaded, info = _model_class(adapted.case.kind).from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
  _compare(f"{adapted.case.name} merged export", adapted.their_logits(reloaded.eval()), adapted.logits)


def test_peft_export_loads_onto_the_base_with_our_logits(adapted, tmp_path):
  lora_config, out = adapted.lora_config, str(tmp_path / "adapters")
  peft_export.save_adapters(out, adapted.pretrained.config, adapted.trained, lora_config, adapted.directory)
  base = _model_class(adapted.case.kind).from_pretrained(adapted.directory)  # fresh: peft adds its layers in place
  model = peft.PeftModel.from_pretrained(base, out).eval()
  assert isinstance(model, peft.PeftModelForCausalLM)
  config = model.peft_config["default"]
  assert (config.r, config.lora_alpha, config.lora_dropout) == (lora_config.rank, lora_config.alpha,
                                                                lora_config.dropout)
  with open(os.path.join(out, peft_export.CONFIG_FILE)) as f:
    assert json.load(f)["base_model_name_or_path"] == adapted.directory
  # Every tensor we wrote was loaded: peft's own state dict of the loaded model is our file, name for name.
  written = safetensors.numpy.load_file(os.path.join(out, peft_export.WEIGHTS_FILE))
  theirs = {name: tensor.numpy() for name, tensor in peft.get_peft_model_state_dict(model).items()}
  assert sorted(theirs) == sorted(written)
  for name, tensor in written.items():
    np.testing.assert_array_equal(theirs[name], tensor, err_msg=name)
  # target_modules adapted those layers and no others (each of our scanned adapters is one per layer).
  adapted_modules = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
  per_stack = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(adapted.trained) if path[-1].key == "lora_a")
  assert len(adapted_modules) == per_stack * VLMConfig.from_dict(adapted.pretrained.config.model).decoder.depth
  assert all(".language_model." in name for name in adapted_modules)
  _compare(f"{adapted.case.name} PEFT export", adapted.their_logits(model), adapted.logits)


def lora_run(workdir: str, directory: str, lora_config: lora.LoraConfig, trained: dict, quantize: str = "",
             step: int = 7) -> str:
  """A lora run's workdir as training leaves it (config.json, a checkpoint of the trained parameters), without the
  training; `quantize`: QLoRA's base (lora.quantize)."""
  config = from_hf.get_config(directory)
  with config.unlocked():
    config.train.stages = workdir_lib.LORA
    config.lora.update(rank=lora_config.rank, alpha=lora_config.alpha, dropout=lora_config.dropout,
                       targets=lora_config.targets, quantize=quantize)
  workdir_lib.write_or_check_config(workdir, config, allow_change=False)
  checkpointer = workdir_lib.Checkpointer(workdir, asynchronous=False)
  checkpointer.save(step, {"params": trained}, {})
  checkpointer.close()
  return workdir


def test_export_command_writes_a_lora_run_merged_or_as_adapters(adapted, tmp_path):
  workdir = lora_run(str(tmp_path / "run"), adapted.directory, adapted.lora_config, adapted.trained)
  merged_dir, adapters_dir, direct = (str(tmp_path / name) for name in ("merged", "adapters", "direct"))
  assert "step 7" in cli.export_checkpoint(workdir, merged_dir)
  reloaded = _model_class(adapted.case.kind).from_pretrained(merged_dir).eval()
  _compare(f"{adapted.case.name} vlmjax export", adapted.their_logits(reloaded), adapted.logits)
  assert hf.load_pretrained(merged_dir).eos_token_ids == adapted.pretrained.eos_token_ids
  assert "step 7" in cli.export_checkpoint(workdir, adapters_dir, adapters=True)
  peft_export.save_adapters(direct, adapted.pretrained.config, adapted.trained, adapted.lora_config,
                            os.path.abspath(adapted.directory))
  for name in (peft_export.CONFIG_FILE, peft_export.WEIGHTS_FILE):  # the command writes what save_adapters does
    with open(os.path.join(adapters_dir, name), "rb") as ours, open(os.path.join(direct, name), "rb") as expected:
      assert ours.read() == expected.read(), name
  with pytest.raises(ValueError, match=f"--adapters: {adapted.directory} is not a lora run"):
    cli.export_checkpoint(adapted.directory, str(tmp_path / "refused"), adapters=True)


def test_export_command_writes_a_qlora_run_as_vlmjax_runs_it(adapted, tmp_path):
  """The merged model of a QLoRA run computes with the quantized base; layers without an adapter (PaliGemma's case
  adapts some) stay quantized in it and are written dequantized."""
  workdir = lora_run(str(tmp_path / "run"), adapted.directory, adapted.lora_config, adapted.trained, quantize="int8")
  out = str(tmp_path / "merged")
  cli.export_checkpoint(workdir, out)
  vlm = vlmjax.load(workdir)
  ours = [np.asarray(vlm.logits(np.asarray([row]), adapted.pixels))[0] for row in adapted.rows]
  assert max_relative_error(ours[0], adapted.logits[0]) > 10 * TOLERANCE  # the int8 base is not the float one
  reloaded = _model_class(adapted.case.kind).from_pretrained(out).eval()
  _compare(f"{adapted.case.name} QLoRA vlmjax export", adapted.their_logits(reloaded), ours)
  assert "quantized to int8 (QLoRA)" in cli.export_checkpoint(workdir, str(tmp_path / "adapters"), adapters=True)


def test_save_adapters_refuses_what_peft_cannot_hold(checkpoint, tmp_path):
  _, directory, _ = checkpoint("llava_gqa")
  config = hf.read_config(directory).config
  lora_config = lora.LoraConfig(rank=2)
  adapter = {"lora_a": np.zeros((48, 2), np.float32), "lora_b": np.zeros((2, 48), np.float32)}
  with pytest.raises(ValueError, match="an adapter on vision/encoder/layers_0/attention/query: PEFT's export takes "
                                       "adapters on the linear layers of the language model's layers only"):
    peft_export.save_adapters(str(tmp_path), config, {"vision": {"encoder": {"layers_0": {"attention": {
        "query": adapter}}}}}, lora_config, directory)
  with pytest.raises(ValueError, match="trained parameter decoder/final_norm/scale is neither an adapter nor the "
                                       "projector"):
    peft_export.save_adapters(str(tmp_path), config, {"decoder": {"final_norm": {"scale": np.ones(48)}}},
                              lora_config, directory)
  with pytest.raises(ValueError, match=r"the adapter on decoder/layers_0/mlp/up has rank 2 .* lora.rank=3"):
    peft_export.save_adapters(str(tmp_path), config, {"decoder": {"layers_0": {"mlp": {"up": adapter}}}},
                              lora.LoraConfig(rank=3), directory)
  shapes = importlib.import_module("configs.shapes_tiny").get_config()
  with pytest.raises(ValueError, match="cannot be written as a Hugging Face llava checkpoint"):
    peft_export.save_adapters(str(tmp_path), shapes, {}, lora_config, directory)


def test_target_modules_names_exactly_the_adapted_layers():
  prefix = "model.language_model.layers."
  modules = [f"{prefix}{i}.self_attn.q_proj" for i in range(3)] + [f"{prefix}1.mlp.down_proj", f"{prefix}2.mlp.up_proj"]
  pattern = peft_export.target_modules(modules, depth=3)
  candidates = [f"{prefix}{i}.{suffix}" for i in range(3) for suffix in ("self_attn.q_proj", "self_attn.k_proj",
                                                                        "mlp.down_proj", "mlp.up_proj")]
  assert [name for name in candidates if re.fullmatch(pattern, name)] == sorted(modules, key=candidates.index)
  assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")



# Models whose images give a token count each, adapters on every linear layer of the language model (Qwen's q/k/v
# carry biases that the adapters sit beside), its patch merger as the projector; a batch of two image sizes. The
# adapters are drawn smaller than the others': at 0.3 Qwen's tiny model's activations grow so large that float32
# rounding alone differs by 5e-5 between two correct implementations (0.7e-6 at 0.05, as the base's).
VARIABLE_LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.05)
VARIABLE_ADAPTER_SCALE = 0.1
# Their `_their_inputs` (Qwen2-VL's processor steps are Qwen2.5-VL's) and transformers classes.
VARIABLE_MODULES = {"llava_next": test_llava_next, "qwen2_5_vl": test_qwen2_5_vl, "qwen2_vl": test_qwen2_5_vl}
VARIABLE_CLASSES = {"llava_next": transformers.LlavaNextForConditionalGeneration,
                    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
                    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}


@dataclasses.dataclass(frozen=True)
class VariableAdapted:
  """A tiny LLaVA-NeXT, Qwen2.5-VL or Qwen2-VL with made-up adapters and projector, and our logits of a batch of two
  image sizes."""

  name: str
  directory: str
  pretrained: hf.Pretrained
  trained: dict  # adapters and projector (Qwen's merger), layers scanned
  images: list[np.ndarray]
  texts: list[str]  # each row's chat-template text, for transformers' processor
  logits: list[np.ndarray]  # per row float32[T, V]: the module running its adapters

  def their_logits(self, model) -> list[np.ndarray]:
    found = []
    for text, image in zip(self.texts, self.images):
      inputs = VARIABLE_MODULES[self.name]._their_inputs(self.directory, [text], [image])
      with torch.no_grad():
        found.append(model(**inputs).logits[0].numpy())
    return found

  def __repr__(self) -> str:
    return f"VariableAdapted({self.name})"


@pytest.fixture(scope="module", params=list(VARIABLE_CLASSES))
def variable_adapted(request, tmp_path_factory) -> VariableAdapted:
  directory = str(tmp_path_factory.mktemp(request.param))
  write_variable_checkpoint(request.param, directory)
  pretrained = hf.load_pretrained(directory)
  trained = random_trained(pretrained, VARIABLE_LORA, VARIABLE_ADAPTER_SCALE)
  _, base = optim.split_trained(pretrained.params, "lora")
  model_config = adapters.adapted(VLMConfig.from_dict(pretrained.config.model), VARIABLE_LORA)
  images = images_of([(37, 52), (61, 29)])
  vlm = vlmjax.load(directory)
  rows, pixels, texts = chat_rows(vlm, [[image] for image in images], PROMPTS[:2])
  ids, _ = padded(vlm, rows)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(lambda params, ids, pixels: VLM(model_config).apply(
        {"params": params}, ids, pixels)[0])(lora.combine(base, trained), jnp.asarray(ids), pixels))
  return VariableAdapted(request.param, directory, pretrained, trained, images, texts,
                         [logits[i, :len(row)] for i, row in enumerate(rows)])


def test_variable_tokens_peft_export_loads_onto_the_base_with_our_logits(variable_adapted, tmp_path):
  adapted, out = variable_adapted, str(tmp_path / "adapters")
  peft_export.save_adapters(out, adapted.pretrained.config, adapted.trained, VARIABLE_LORA, adapted.directory)
  base = VARIABLE_CLASSES[adapted.name].from_pretrained(adapted.directory)
  assert max_relative_error(adapted.their_logits(base)[0], adapted.logits[0]) > 100 * TOLERANCE  # the adapters matter
  model = peft.PeftModel.from_pretrained(base, out).eval()
  written = safetensors.numpy.load_file(os.path.join(out, peft_export.WEIGHTS_FILE))
  theirs = {name: tensor.numpy() for name, tensor in peft.get_peft_model_state_dict(model).items()}
  assert sorted(theirs) == sorted(written)  # every tensor we wrote was loaded, the projector's among them
  projector = ".multi_modal_projector." if adapted.name == "llava_next" else ".visual.merger."
  assert any(projector in name for name in written)
  adapted_modules = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
  per_stack = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(adapted.trained) if path[-1].key == "lora_a")
  assert len(adapted_modules) == per_stack * VLMConfig.from_dict(adapted.pretrained.config.model).decoder.depth
  assert all(".language_model." in name for name in adapted_modules)
  _compare(f"{adapted.name} PEFT export", adapted.their_logits(model), adapted.logits)


def test_variable_tokens_merged_export_loads_in_transformers_with_our_logits(variable_adapted, tmp_path):
  adapted, out = variable_adapted, str(tmp_path / "merged")
  pretrained = adapted.pretrained
  _, frozen = optim.split_trained(pretrained.params, "lora")
  merged = lora.merge(lora.combine(frozen, adapted.trained), VARIABLE_LORA)
  hf.save_pretrained(out, pretrained.config, merged, pretrained.tokenizer, pretrained.image_processor,
                     eos_token_ids=pretrained.eos_token_ids, pad_token_id=pretrained.pad_token_id,
                     max_len=pretrained.max_len)
  reloaded, info = VARIABLE_CLASSES[adapted.name].from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  _compare(f"{adapted.name} merged export", adapted.their_logits(reloaded.eval()), adapted.logits)
