"""The VLM facade: load a model and ask it things.

    import vlmjax
    vlm = vlmjax.load("/path/to/workdir_or_hf_dir")
    vlm.generate([image], ["What colour is the circle?"])       # -> ["red"]
    vlm.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], [image])

`load` reads a vlmjax training workdir (config.json, tokenizer and image-processor files, orbax checkpoints)
or a Hugging Face LLaVA-1.5 / LLaVA-NeXT / PaliGemma / Qwen2.5-VL directory, told apart by config.json. A LLaVA-NeXT
or Qwen2.5-VL image gives as many tokens as its size asks for: its prompt's placeholder is expanded to that count
and the batch's images travel as `Tiles` (`vlmjax.models.anyres`) or `Patches` (`vlmjax.models.qwen_vl`).
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax import workdir as workdir_lib
from vlmjax.data import variable_images
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.infer import generate as generation
from vlmjax.infer import quantize as quantize_lib
from vlmjax.infer.sampling import SamplingParams
from vlmjax.models import anyres, layers, qwen_vl
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.models.summary import abstract_params
from vlmjax.models.vlm import VLM as VLMModel
from vlmjax.models.vlm import Patches, Tiles, VLMConfig
from vlmjax.train import adapters


@dataclasses.dataclass
class VLM:
  """A loaded vision-language model: config, parameters (layers unrolled), tokenizer, image processor and end
  tokens."""

  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Tokenizer
  image_processor: ImageProcessor
  eos_token_ids: tuple[int, ...]
  pad_token_id: int
  max_len: int | None = None  # the model's context length, when the checkpoint states one
  source: str | None = None  # where it was loaded from (a workdir and its step, a Hugging Face directory)
  _fingerprint: str | None = dataclasses.field(default=None, init=False, repr=False)

  def __post_init__(self):
    # Decoding wants each layer's weights and KV cache as buffers of their own (read in place every step), so a
    # scanned checkpoint's layer stacks are unstacked once, here; `config` (a copy) says model.scan_layers=False.
    # `vlmjax.interop.hf.save_pretrained` takes either form.
    if self.config.model.get("scan_layers", True):
      self.params = layers.unstack_layers(self.params)
      self.config = self.config.copy_and_resolve_references()
      with self.config.unlocked():
        self.config.model.scan_layers = False

  @property
  def model_config(self) -> VLMConfig:
    return VLMConfig.from_dict(self.config.model)

  def sharded(self, mesh: dict[str, int]) -> "VLM":
    """The same model with its weights sharded over a mesh of this process's devices (`{"tensor": 4}`,
    `{"fsdp": 8}`, axes data / fsdp / tensor, their product devices, the first ones), by the one rules table
    (`parallel/mesh.py`): attention heads and MLP split over `tensor`, the model width over `fsdp`. `generate`, the
    engine and `logits` then run on the mesh: XLA partitions each program from its weights' shardings (GSPMD), the
    KV cache's heads following the key and value projections. ValueError naming the parameter whose dimension a
    mesh axis does not divide."""
    if quantize_lib.recorded(self.config).scheme is not None:
      raise ValueError("sharding a quantized model is not supported yet: load it unquantized with a mesh")
    sizes = {axis: size for axis, size in mesh.items() if size != 1}
    count = int(np.prod(list(sizes.values()))) if sizes else 1
    devices = jax.local_devices()
    if count > len(devices):
      raise ValueError(f"mesh {mesh} needs {count} devices; this process has {len(devices)}")
    device_mesh = mesh_lib.make_mesh(sizes, devices[:count])
    boxed = abstract_params(self.model_config)
    shardings = mesh_lib.param_shardings(boxed, device_mesh, mesh_lib.LOGICAL_RULES)
    return dataclasses.replace(self, params=jax.device_put(self.params, shardings))

  def with_visual_tokens(self, spec: str) -> "VLM":
    """The same model with each image reduced to fewer tokens without retraining, `METHOD:KEEP`
    (`models/visual_tokens.py`; "" or "none": every token). ValueError for a spec the model cannot take."""
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.model.visual_tokens = "" if spec == "none" else spec
    VLMConfig.from_dict(config.model)  # checks the method and KEEP against the model's tokens
    return dataclasses.replace(self, config=config)

  def fingerprint(self) -> dict[str, str | None]:
    """What identifies this model's answers, for caches of them (`eval/harness.py`): where it came from, and a
    digest of everything that decides its text: every parameter, the model config, the tokenizer with its chat
    template, the image processor and the end tokens. Two models with a different weight anywhere differ."""
    if self._fingerprint is None:
      digest = hashlib.sha256(_weights_digest(self.params))
      for part in (self.config.model.to_json(sort_keys=True), self.tokenizer.backend.to_str(),
                   self.tokenizer.chat_template or "", json.dumps(self.tokenizer.config, sort_keys=True, default=str),
                   json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str),
                   repr((self.eos_token_ids, self.pad_token_id, self.max_len))):
        digest.update(part.encode())
      self._fingerprint = digest.hexdigest()[:32]
    return {"source": self.source, "digest": self._fingerprint}

  def logits(self, input_ids, pixel_values) -> jax.Array:
    """float32[B, T, V] for int[B, T] ids (placeholders expanded) and float32[B, H, W, 3] normalized pixels
    (`Tiles` or `Patches` for a model with variable image tokens). For prefix-LM models the whole input is the
    prefix. With FastV (`visual_tokens` fastv:...), ranked by each row's last token, the logits of the tokens its
    later layers keep, in order: float32[B, T - dropped, V]."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    prefix = jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32) if self.model_config.prefix_lm else None
    logits, _ = _forward(self.params, self.model_config, input_ids, _pixels(pixel_values), prefix)
    return logits

  def generate_ids(self, input_ids, pixel_values, max_new_tokens: int = 32, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, attention_mask=None) -> np.ndarray:
    """New tokens int[B, max_new_tokens]: each row stops at an end token and is padded after it.

    `attention_mask` (int[B, T], 1 for real tokens, left or right padding) lets rows differ in length.
    """
    input_ids = np.asarray(input_ids)
    sampling = SamplingParams.fill(input_ids.shape[0], temperature, top_k, top_p)
    return generation.generate(self.params, self.model_config, input_ids, attention_mask, _pixels(pixel_values),
                               max_new_tokens=max_new_tokens, eos_ids=self.eos_token_ids, pad_id=self.pad_token_id,
                               sampling=sampling, seed=seed, max_len=self.max_len)

  def prompt_ids(self, messages: list[dict], num_images: int,
                 image_token_counts: Sequence[int] | None = None) -> list[int]:
    """Token ids of a conversation through the chat template (with the generation prompt), each image
    placeholder expanded to the model's image-token count, or for a model with variable image tokens to its
    image's count in `image_token_counts` (`image_token_count` of each image, in order). A prefix-LM (PaliGemma)
    or a checkpoint without a chat template gets its processor's prompt instead (PaliGemma: the images, BOS, the user
    text and a newline)."""
    config = self.model_config
    if config.variable_image_tokens != (image_token_counts is not None):
      raise ValueError("image_token_counts are needed for, and only for, a model whose images give a token count "
                       "each (model.image_grid_pinpoints)")
    if image_token_counts is not None:  # placeholders left single, then each expanded to its image's count
      return _expanded(self._prompt_ids(messages, num_images, 1), config.image_token_id, image_token_counts)
    return self._prompt_ids(messages, num_images, config.tokens_per_image)

  def image_token_count(self, size: tuple[int, ...]) -> int:
    """The placeholders of one image of a model whose images give a token count each, by the size its image
    processor gives with it: LLaVA-NeXT's (height, width), Qwen2.5-VL's grid (t, h, w)."""
    return variable_images.VariableImages(self.model_config).count(size)

  def _prompt_ids(self, messages: list[dict], num_images: int, tokens_per_image: int) -> list[int]:
    config = self.model_config
    if config.prefix_lm or self.tokenizer.chat_template is None:
      text = " ".join(part["text"] for message in messages if message["role"] == "user"
                      for part in _parts(message["content"]) if part["type"] == "text")
      return self.tokenizer.encode_prompt(text, config.image_token_id, tokens_per_image, config.prefix_lm,
                                          num_images=num_images)
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = self.tokenizer.encode_rendered(text).ids
    found = ids.count(config.image_token_id)
    if found != num_images:
      raise ValueError(f"the prompt has {found} image placeholders but {num_images} images were given")
    expanded = []
    for token in ids:
      expanded.extend([token] * (tokens_per_image if token == config.image_token_id else 1))
    return expanded

  def chat(self, messages: list[dict], images: Sequence[Any] = (), **sampling) -> str:
    """The assistant's reply to an OpenAI-style conversation (content parts {"type": "image"} mark where the
    `images`, in order, go)."""
    return self.chat_batch([messages], [list(images)], **sampling)[0]

  def generate(self, images: Sequence[Any], prompts: Sequence[str], **sampling) -> list[str]:
    """One reply per (image, prompt): each prompt is one user turn with its image first."""
    if len(images) != len(prompts):
      raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
                     for prompt in prompts]
    return self.chat_batch(conversations, [[image] for image in images], **sampling)

  def stream(self, images: Sequence[Any], prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
    """The reply to one user turn (its images first), yielded as text pieces as the tokens are produced."""
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
    pixel_values, token_counts = self._images([list(images)])
    input_ids = np.asarray([self.prompt_ids(messages, len(images), token_counts and token_counts[0])])
    pixel_values = _pixels(pixel_values)
    tokens, shown = [], ""
    for step in generation.stream(self.params, self.model_config, input_ids, None, pixel_values,
                                  max_new_tokens=max_new_tokens, eos_ids=self.eos_token_ids,
                                  pad_id=self.pad_token_id, sampling=SamplingParams.fill(1, temperature, top_k, top_p),
                                  seed=seed, max_len=self.max_len):
      if int(step[0]) in self.eos_token_ids:
        return
      tokens.append(int(step[0]))
      text = self.tokenizer.decode(tokens)  # decoded whole: a piece may need the tokens after it
      yield text[len(shown):]
      shown = text

  def chat_batch(self, conversations: list[list[dict]], images: list[list[Any]], **sampling) -> list[str]:
    """`chat` for a batch of conversations at once (rows of different lengths and image counts)."""
    pixel_values, token_counts = self._images(images)
    rows = [self.prompt_ids(messages, len(row_images), token_counts and token_counts[i])
            for i, (messages, row_images) in enumerate(zip(conversations, images))]
    width = max(map(len, rows))
    input_ids = np.full((len(rows), width), self.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
      input_ids[i, :len(row)], mask[i, :len(row)] = row, True
    tokens = self.generate_ids(input_ids, pixel_values, attention_mask=mask, **sampling)
    return [self.tokenizer.decode([int(t) for t in row if t not in self.eos_token_ids and t != self.pad_token_id])
            for row in tokens]

  def _images(self, images: list[list[Any]]) -> tuple[np.ndarray | Tiles | Patches | None, list[list[int]] | None]:
    """The pixel input of a batch whose row i shows images[i]: float32[B, I, H, W, 3] (zeros where a row has fewer
    images), or for a model with variable image tokens its `Tiles` or `Patches` and each row's images' token counts
    (else None); None without any image."""
    config = self.model_config
    if config.variable_image_tokens:
      processed = [self.image_processor(row_images) for row_images in images]
      counts = [[self.image_token_count(size) for _, size in row] for row in processed]
      batch = qwen_vl.batch_patches if config.qwen_tower else anyres.batch_tiles
      return (batch(config, processed) if any(counts) else None), counts
    num_images = max(len(row_images) for row_images in images)
    if not num_images:
      return None, None
    size = config.vision.image_size
    pixel_values = np.zeros((len(images), num_images, size, size, 3), np.float32)
    for i, row_images in enumerate(images):
      if row_images:
        pixel_values[i, :len(row_images)] = self.image_processor(row_images)
    return pixel_values, None


def _expanded(ids: list[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
  """`ids` with their k-th image placeholder repeated counts[k] times, as LlavaNextProcessor expands `<image>`."""
  found = ids.count(image_token_id)
  if found != len(counts):
    raise ValueError(f"the prompt has {found} image placeholders but {len(counts)} images were given")
  counts, expanded = iter(counts), []
  for token in ids:
    expanded.extend([token] * (next(counts) if token == image_token_id else 1))
  return expanded


def _parts(content) -> list[dict]:
  """A message's content as OpenAI-style parts (a plain string is one text part)."""
  return [{"type": "text", "text": content}] if isinstance(content, str) else content


@jax.jit
def _leaf_statistics(params) -> list[jax.Array]:
  """Per parameter: its sum, its sum of squares and its first and last elements (float32), computed where the
  parameter lives."""
  def statistics(x):
    x = x.astype(jnp.float32).ravel()
    return jnp.stack([jnp.sum(x), jnp.sum(x * x), x[0], x[-1]])
  return [statistics(leaf) for leaf in jax.tree.leaves(params)]


def _weights_digest(params) -> bytes:
  """A digest of a parameter tree: its paths, shapes and dtypes, and per leaf four statistics of its values. Any
  training step or different initialization changes them, and only four numbers per leaf leave the device (a
  7B model's 14 GB are summed in place, not copied to the host and hashed)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
  for statistics in jax.device_get(_leaf_statistics(params)):
    digest.update(np.asarray(statistics, np.float32).tobytes())
  return digest.digest()


def _pixels(pixel_values):
  if isinstance(pixel_values, (Tiles, Patches)):  # float32 pixels, int32 tables
    tables = {field.name: jnp.asarray(getattr(pixel_values, field.name), jnp.int32)
              for field in dataclasses.fields(pixel_values) if field.name != "pixel_values"}
    return pixel_values.replace(pixel_values=_float_pixels(pixel_values.pixel_values), **tables)
  return None if pixel_values is None else _float_pixels(pixel_values)


def _float_pixels(pixels) -> jax.Array:
  """float32 pixels on JAX's device; `jax.device_put` rather than `jnp.asarray`, which copies even an array that a
  CPU device can read in place (`runtime.aligned_zeros`)."""
  if isinstance(pixels, jax.Array):
    return pixels.astype(jnp.float32)
  return jax.device_put(np.asarray(pixels, np.float32))


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, config: VLMConfig, input_ids, pixel_values, prefix_lengths):
  return VLMModel(config).apply({"params": params}, input_ids, pixel_values, prefix_lengths=prefix_lengths)


def from_trained(config: ml_collections.ConfigDict, params, model_dir: str, source: str | None = None) -> VLM:
  """A VLM of a training config's `params`, with the tokenizer and image processor saved in model_dir (a workdir,
  or the data set's tokenizer folder during training); the tokenizer's end token stops generation."""
  tokenizer = Tokenizer.from_directory(model_dir)
  return VLM(config=config, params=params, tokenizer=tokenizer, image_processor=ImageProcessor.from_directory(
      model_dir), eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id, source=source)


def load_workdir(workdir: str) -> VLM:
  """The trained model of a vlmjax training workdir: its latest checkpoint, or, when that one is damaged, the newest
  earlier one that restores (the step skipped and the step used are logged as warnings; `source` names the step).
  Raises FileNotFoundError without any checkpoint and workdir.NoReadableCheckpoint when none restores."""
  config = workdir_lib.read_config(workdir)
  if workdir_lib.is_lora_run(config):
    return _load_adapted(workdir, config)
  abstract = quantize_lib.abstract_quantized(config, nn.meta.unbox(abstract_params(VLMConfig.from_dict(config.model))))
  step, params = _restore_latest(workdir, abstract)
  vlm = from_trained(config, params, workdir, source=f"{os.path.abspath(workdir)} step {step}")
  generation_settings = config.get("generation")  # a checkpoint `vlmjax quantize` wrote: its source's end tokens
  if generation_settings:
    vlm = dataclasses.replace(vlm, eos_token_ids=tuple(generation_settings.eos_token_ids),
                              pad_token_id=generation_settings.pad_token_id, max_len=generation_settings.max_len)
  return vlm


def _restore_latest(workdir: str, abstract) -> tuple[int, Any]:
  """(step, parameters) of a workdir's latest checkpoint that restores, onto the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  checkpointer = workdir_lib.Checkpointer(workdir, asynchronous=False)
  try:
    found = checkpointer.restore_latest_params(abstract)
  finally:
    checkpointer.close()
  if found is None:
    raise FileNotFoundError(f"{workdir} holds no finished checkpoint yet")
  return found


def lora_trained(workdir: str) -> tuple[dict, int]:
  """What a lora run trained: (the adapters and projector of its latest checkpoint, layers unrolled, and that
  checkpoint's step). Its base is train.init_from, read by `load` (the export of the adapters alone needs none)."""
  config = workdir_lib.read_config(workdir)
  step, trained = _restore_latest(workdir, adapters.abstract_trained(config, VLMConfig.from_dict(config.model)))
  return layers.unstack_layers(trained), step


def _load_adapted(workdir: str, config: ml_collections.ConfigDict) -> VLM:
  """A lora run's model: its base with the trained projector and the adapters merged into the kernels."""
  base = _load(config.train.init_from)
  trained, step = lora_trained(workdir)
  return dataclasses.replace(base, params=adapters.merged(config, base.params, trained),
                             source=f"{os.path.abspath(workdir)} step {step} (LoRA on {base.source})")


def load(path: str, *, dtype: str | None = None, quantize: str | None = None, kv_cache_dtype: str | None = None,
         quantize_vision: bool = False, visual_tokens: str | None = None, mesh: dict[str, int] | None = None) -> VLM:
  """A vlmjax training workdir or a Hugging Face LLaVA-1.5 / LLaVA-NeXT / PaliGemma / Qwen2.5-VL directory (or a
  quantized checkpoint that `vlmjax quantize` wrote). `visual_tokens`: `METHOD:KEEP`, each image's tokens reduced
  without retraining (`VLM.with_visual_tokens`).

  dtype: 'float32' or 'bfloat16' (None: float32 on a CPU, or the workdir's config; bfloat16 on a GPU or TPU).
  quantize: None, 'int8' (weights per output channel), 'int4' / 'int4:GROUP' (groups of 128 or GROUP inputs) or
  'w8a8' (INT8 weights and per-token INT8 activations) for the language model's and projector's linear layers, its
  embedding and output head, and with quantize_vision the vision tower's (`vlmjax/infer/quantize.py`).
  kv_cache_dtype: None (the compute dtype) or 'int8' (a scale per token and head), for `generate` and the engine.
  mesh: the weights sharded over this many devices per mesh axis (`{"tensor": 4}`; `VLM.sharded`).
  """
  settings = quantize_lib.Settings.parse(dtype, quantize, kv_cache_dtype, quantize_vision)  # bad settings fail first
  vlm = _load(path)
  config, params = quantize_lib.apply(vlm.config, vlm.params, settings, source=path)
  vlm = dataclasses.replace(vlm, config=config, params=params)
  if mesh:
    vlm = vlm.sharded(mesh)
  return vlm if visual_tokens is None else vlm.with_visual_tokens(visual_tokens)


def _load(path: str) -> VLM:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory: give a vlmjax workdir or a Hugging Face model directory")
  if workdir_lib.is_workdir(path):
    return load_workdir(path)
  from vlmjax.interop import hf

  pretrained = hf.load_pretrained(path)
  return VLM(config=pretrained.config, params=pretrained.params, tokenizer=pretrained.tokenizer,
             image_processor=pretrained.image_processor, eos_token_ids=tuple(pretrained.eos_token_ids),
             pad_token_id=pretrained.pad_token_id, max_len=pretrained.max_len, source=os.path.abspath(path))
