"""Hugging Face LLaVA / LLaVA-NeXT / PaliGemma / Qwen2(.5)-VL safetensors <-> the parameters of `vlmjax.models.vlm.VLM`.

Every parameter of ours names the Hugging Face tensor it comes from and how its axes map (`TENSORS`):
[out, in] Linear weights become [in, out] kernels, q/k/v/o projections get their head axes ([D, N, H] and
[N, H, D]), the [D, 3, p, p] patch convolution becomes [p, p, 3, D], and the per-layer tensors of the ViT and the
decoder are stacked along a leading `layers` axis (our layers are scanned). Tensors are read slice by slice
(`safe_open(...).get_slice`), so with a mesh every device reads only its own shard.

Names are handled in one canonical layout, the one transformers 4.x wrote (`vision_tower.vision_model.*`,
`language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.*`, `image_newline`); the newer
layouts (`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`, `vision_tower.*` without
`vision_model`, `model.image_newline`) are renamed into it on reading, and writing uses it (transformers 4 and 5
both load it). Qwen2(.5)-VL's tower is `visual.*` (`model.visual.*` in the module's own names) and its language model
`model.*` (or `model.language_model.*`), renamed into the same text layout; it is written as transformers saves it
and Qwen publishes it (`QWEN_SAVED`: `visual.*`, `model.*`, `lm_head.weight`), by the same renames read backwards.
"""

import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
VISION = "vision_tower.vision_model."
TEXT = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
PROJECTOR = "multi_modal_projector."
NEWLINE = "image_newline"  # LLaVA-NeXT's embedding after each row of an image's tiles
QWEN_VISION = "visual."  # Qwen2-VL's and Qwen2.5-VL's vision tower

# Qwen2(.5)-VL's text model and head as transformers saves them (`model.{layers,embed_tokens,norm}.*`, `lm_head.weight`;
# the newer LLaVA layout's head too) -> the canonical layout; its tower's `visual.*` is canonical already.
QWEN_SAVED = (
    ("model.layers.", TEXT + "layers."),
    ("model.embed_tokens.", TEXT + "embed_tokens."),
    ("model.norm.", TEXT + "norm."),
    ("lm_head.", "language_model.lm_head."),
)
# Prefixes of the layouts transformers has written -> the canonical layout (first match wins).
RENAMES = (
    ("model.vision_tower.vision_model.", VISION),
    ("model.vision_tower.", VISION),
    (VISION, VISION),
    ("vision_tower.", VISION),
    ("model.language_model.", TEXT),
    ("model.multi_modal_projector.", PROJECTOR),
    ("model.image_newline", NEWLINE),
    ("model.visual.", QWEN_VISION),
    *QWEN_SAVED,
)
# Tensors a checkpoint may hold that are not parameters of the model or that it does not use.
UNUSED = (
    re.compile(r"\.position_ids$|\.inv_freq$"),  # buffers of older transformers versions
    re.compile(re.escape(VISION + "head.")),  # SigLIP's pooling head: PaliGemma takes the patch tokens
    re.compile(re.escape(VISION + "post_layernorm.")),  # CLIP's final norm: LLaVA takes a hidden state before it
)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a Hugging Face tensor becomes one of our parameters: axis `split` of the HF tensor (if any) is split in
  `parts` axes (heads, head_dim; or q/k/v, heads, head_dim), then the axes are transposed: our axis i is axis perm[i]
  of the split tensor."""

  perm: tuple[int, ...]
  split: int | None = None
  parts: int = 2

  def _split_shape(self, shape: tuple[int, ...]) -> list[int]:
    split_shape = [0] * len(shape)
    for axis, source in enumerate(self.perm):
      split_shape[source] = shape[axis]
    return split_shape

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for our (one-layer) parameter shape."""
    split_shape = self._split_shape(shape)
    if self.split is not None:
      split_shape[self.split:self.split + self.parts] = [int(np.prod(split_shape[self.split:self.split + self.parts]))]
    return tuple(split_shape)

  def read(self, tensor: Any, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Our parameter's block `index` (slices into `shape`), read from a safetensors slice: float32, only the rows
    the block needs."""
    ranges = [None] * len(shape)
    for axis, source in enumerate(self.perm):
      ranges[source] = range(*index[axis].indices(shape[axis]))
    hf_index = [slice(r.start, r.stop) for r in ranges]
    if self.split is None:
      block = np.asarray(tensor[tuple(hf_index)]).astype(np.float32)
    else:
      k, parts = self.split, self.parts
      inner = self._split_shape(shape)[k + 1:k + parts]
      size = int(np.prod(inner))
      hf_index[k:k + parts] = [slice(ranges[k].start * size, ranges[k].stop * size)]  # whole outer parts, then cut
      block = np.asarray(tensor[tuple(hf_index)]).astype(np.float32)
      block = block.reshape(block.shape[:k] + (len(ranges[k]), *inner) + block.shape[k + 1:])
      cut = tuple(slice(r.start, r.stop) for r in ranges[k + 1:k + parts])
      block = block[(slice(None),) * (k + 1) + cut]
    return np.transpose(block, self.perm)

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    """Our (one-layer) parameter -> the HF tensor."""
    split = np.transpose(value, np.argsort(self.perm))
    return np.ascontiguousarray(split.reshape(self.hf_shape(value.shape)))


SAME1, SAME2 = Layout((0,)), Layout((0, 1))
LINEAR = Layout((1, 0))  # [out, in] -> [in, out]
CONV = Layout((2, 3, 1, 0))  # [D, 3, p, p] -> [p, p, 3, D]
HEADS_IN = Layout((2, 0, 1), split=0)  # [N*H, D] -> [D, N, H]
HEADS_OUT = Layout((1, 2, 0), split=1)  # [D, N*H] -> [N, H, D]
HEADS_BIAS = Layout((0, 1), split=0)  # [N*H] -> [N, H]
QKV_IN = Layout((3, 0, 1, 2), split=0, parts=3)  # fused [3*N*H, D] -> [D, 3, N, H]
QKV_BIAS = Layout((0, 1, 2), split=0, parts=3)  # [3*N*H] -> [3, N, H]
CONV3D = Layout((1, 2, 3, 4, 0))  # [D, 3, T, p, p] -> [3, T, p, p, D]


def _vision_layer(name: str) -> str:
  return f"{VISION}encoder.layers.{{}}.{name}"


def _qwen_vision_layer(name: str) -> str:
  return f"{QWEN_VISION}blocks.{{}}.{name}"


def _text_layer(name: str) -> str:
  return f"{TEXT}layers.{{}}.{name}"


PROJECTOR_LAYERS = ("linear", "linear_1", "linear_2")  # PaliGemma's one, LLaVA's two

# Our parameter path -> (canonical HF name, with {} for the layer index of stacked layers; layout).
TENSORS: dict[str, tuple[str, Layout]] = {
    "vision/patch_embedding/kernel": (VISION + "embeddings.patch_embedding.weight", CONV),
    "vision/patch_embedding/bias": (VISION + "embeddings.patch_embedding.bias", SAME1),
    "vision/position_embedding": (VISION + "embeddings.position_embedding.weight", SAME2),
    "vision/cls_token": (VISION + "embeddings.class_embedding", SAME1),
    "vision/pre_norm/scale": (VISION + "pre_layrnorm.weight", SAME1),
    "vision/pre_norm/bias": (VISION + "pre_layrnorm.bias", SAME1),
    "vision/post_norm/scale": (VISION + "post_layernorm.weight", SAME1),
    "vision/post_norm/bias": (VISION + "post_layernorm.bias", SAME1),
    "vision/encoder/layers/attention_norm/scale": (_vision_layer("layer_norm1.weight"), SAME1),
    "vision/encoder/layers/attention_norm/bias": (_vision_layer("layer_norm1.bias"), SAME1),
    **{f"vision/encoder/layers/attention/{ours}/kernel": (_vision_layer(f"self_attn.{hf}_proj.weight"), HEADS_IN)
       for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))},
    **{f"vision/encoder/layers/attention/{ours}/bias": (_vision_layer(f"self_attn.{hf}_proj.bias"), HEADS_BIAS)
       for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))},
    "vision/encoder/layers/attention/out/kernel": (_vision_layer("self_attn.out_proj.weight"), HEADS_OUT),
    "vision/encoder/layers/attention/out/bias": (_vision_layer("self_attn.out_proj.bias"), SAME1),
    "vision/encoder/layers/mlp_norm/scale": (_vision_layer("layer_norm2.weight"), SAME1),
    "vision/encoder/layers/mlp_norm/bias": (_vision_layer("layer_norm2.bias"), SAME1),
    "vision/encoder/layers/mlp/up/kernel": (_vision_layer("mlp.fc1.weight"), LINEAR),
    "vision/encoder/layers/mlp/up/bias": (_vision_layer("mlp.fc1.bias"), SAME1),
    "vision/encoder/layers/mlp/down/kernel": (_vision_layer("mlp.fc2.weight"), LINEAR),
    "vision/encoder/layers/mlp/down/bias": (_vision_layer("mlp.fc2.bias"), SAME1),
    **{f"projector/{name}/kernel": (f"{PROJECTOR}{name}.weight", LINEAR) for name in PROJECTOR_LAYERS},
    **{f"projector/{name}/bias": (f"{PROJECTOR}{name}.bias", SAME1) for name in PROJECTOR_LAYERS},
    "image_newline": (NEWLINE, SAME1),
    "decoder/embedding": (TEXT + "embed_tokens.weight", SAME2),
    "decoder/final_norm/scale": (TEXT + "norm.weight", SAME1),
    "decoder/output_head": (LM_HEAD, LINEAR),
    "decoder/layers/attention_norm/scale": (_text_layer("input_layernorm.weight"), SAME1),
    **{f"decoder/layers/attention/{ours}/kernel": (_text_layer(f"self_attn.{hf}_proj.weight"), HEADS_IN)
       for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))},
    **{f"decoder/layers/attention/{ours}/bias": (_text_layer(f"self_attn.{hf}_proj.bias"), HEADS_BIAS)
       for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))},
    "decoder/layers/attention/out/kernel": (_text_layer("self_attn.o_proj.weight"), HEADS_OUT),
    "decoder/layers/mlp_norm/scale": (_text_layer("post_attention_layernorm.weight"), SAME1),
    **{f"decoder/layers/mlp/{name}/kernel": (_text_layer(f"mlp.{name}_proj.weight"), LINEAR)
       for name in ("gate", "up", "down")},
    # Qwen2.5-VL's and Qwen2-VL's vision tower (`models/qwen_vit.py`; norm biases: Qwen2-VL's LayerNorms)
    "vision/patches/kernel": (QWEN_VISION + "patch_embed.proj.weight", CONV3D),
    "vision/layers/attention_norm/scale": (_qwen_vision_layer("norm1.weight"), SAME1),
    "vision/layers/attention_norm/bias": (_qwen_vision_layer("norm1.bias"), SAME1),
    "vision/layers/qkv/kernel": (_qwen_vision_layer("attn.qkv.weight"), QKV_IN),
    "vision/layers/qkv/bias": (_qwen_vision_layer("attn.qkv.bias"), QKV_BIAS),
    "vision/layers/out/kernel": (_qwen_vision_layer("attn.proj.weight"), HEADS_OUT),
    "vision/layers/out/bias": (_qwen_vision_layer("attn.proj.bias"), SAME1),
    "vision/layers/mlp_norm/scale": (_qwen_vision_layer("norm2.weight"), SAME1),
    "vision/layers/mlp_norm/bias": (_qwen_vision_layer("norm2.bias"), SAME1),
    **{f"vision/layers/mlp/{name}/{kind}": (_qwen_vision_layer(f"mlp.{name}_proj.{hf_kind}"), layout)
       for name in ("gate", "up", "down") for kind, hf_kind, layout in (("kernel", "weight", LINEAR),
                                                                        ("bias", "bias", SAME1))},
    "vision/merger_norm/scale": (QWEN_VISION + "merger.ln_q.weight", SAME1),
    "vision/merger_norm/bias": (QWEN_VISION + "merger.ln_q.bias", SAME1),
    **{f"vision/merger_{ours}/{kind}": (f"{QWEN_VISION}merger.mlp.{hf}.{hf_kind}", layout)
       for ours, hf in (("1", "0"), ("2", "2")) for kind, hf_kind, layout in (("kernel", "weight", LINEAR),
                                                                             ("bias", "bias", SAME1))},
}


# Qwen2-VL's vision MLP is plain (fc1, act, fc2) where Qwen2.5-VL's is gated (gate_proj, up_proj, down_proj): our
# paths `up` and `down` are its fc1 and fc2 (`tensors_of`).
QWEN2_VL_MLP = {f"vision/layers/mlp/{ours}/{kind}": (_qwen_vision_layer(f"mlp.{hf}.{hf_kind}"), layout)
                for ours, hf in (("up", "fc1"), ("down", "fc2"))
                for kind, hf_kind, layout in (("kernel", "weight", LINEAR), ("bias", "bias", SAME1))}


def tensors_of(paths: set[str]) -> dict[str, tuple[str, Layout]]:
  """`TENSORS` for a params tree with these parameter paths: with Qwen2-VL's names for a Qwen vision MLP without a
  gate."""
  if "vision/layers/mlp/up/kernel" in paths and "vision/layers/mlp/gate/kernel" not in paths:
    return {**TENSORS, **QWEN2_VL_MLP}
  return TENSORS


def canonical_name(name: str) -> str:
  for prefix, canonical in RENAMES:
    if name.startswith(prefix):
      return canonical + name[len(prefix):]
  return name


def _path(key_path) -> str:
  return "/".join(str(key.key) for key in key_path)


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our parameters comes from: `shape` is ours, `stacked` when its leading axis is the layers."""

  path: str
  name: str
  layout: Layout
  shape: tuple[int, ...]
  stacked: bool

  def hf_names(self) -> list[str]:
    return [self.name.format(i) for i in range(self.shape[0])] if self.stacked else [self.name]

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape


def plan(abstract_params: Any) -> list[Source]:
  """The source of every leaf of our `params` tree (shapes only), in tree order."""
  leaves = [(_path(key_path), leaf) for key_path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)]
  tensors = tensors_of({path for path, _ in leaves})
  sources = []
  for path, leaf in leaves:
    if path not in tensors:
      raise ValueError(f"parameter {path} has no Hugging Face counterpart (Hugging Face interop needs the model's "
                       f"layers scanned: model.scan_layers=True)")
    name, layout = tensors[path]
    sources.append(Source(path, name, layout, tuple(leaf.shape), stacked="{}" in name))
  return sources


class Checkpoint(contextlib.ExitStack):
  """The safetensors file(s) of a directory, open for slicing, with tensors under their canonical names.

      with Checkpoint(directory) as checkpoint:
        block = checkpoint.slice(name)[0:8, :]
  """

  def __init__(self, directory: str):
    super().__init__()
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    self.directory = directory
    self.files = [os.path.join(directory, file) for file in files]
    self.file_names: dict[str, str] = {}  # canonical name -> the name in the file
    self._handles: dict[str, Any] = {}

  def __enter__(self) -> "Checkpoint":
    super().__enter__()
    try:
      for path in self.files:
        if not os.path.exists(path):
          raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but does not exist")
        # "flax" reads every dtype (numpy has no bfloat16); `read` makes its arrays on the CPU.
        handle = self.enter_context(safetensors.safe_open(path, framework="flax"))
        for name in handle.keys():
          canonical = canonical_name(name)
          if canonical in self.file_names:
            raise ValueError(f"{self.directory}: tensors {self.file_names[canonical]!r} and {name!r} are the same "
                             f"parameter in two key layouts")
          self.file_names[canonical], self._handles[canonical] = name, handle
    except BaseException:
      self.close()
      raise
    return self

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[name].get_slice(self.file_names[name]).get_shape())

  def slice(self, name: str) -> Any:
    return self._handles[name].get_slice(self.file_names[name])

  def read(self, source: Source, index: tuple[slice, ...]) -> np.ndarray:
    """Block `index` of our parameter `source`, float32: each stacked layer read from its own tensor."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      if not source.stacked:
        return source.layout.read(self.slice(source.name), source.shape, index)
      layers = range(*index[0].indices(source.shape[0]))
      return np.stack([source.layout.read(self.slice(source.name.format(i)), source.layer_shape, index[1:])
                       for i in layers])


def _problems(message: str, items: list[str]) -> str:
  shown = "\n  ".join(items[:20])
  more = f"\n  ... and {len(items) - 20} more" if len(items) > 20 else ""
  return f"{message}:\n  {shown}{more}"


def check(checkpoint: Checkpoint, sources: list[Source], tie_embeddings: bool) -> None:
  """Every parameter of ours has its tensor with the right shape, and every tensor is used; ValueError naming
  each problem (a missing tensor by its canonical name, the others as the files name them)."""
  missing, mismatched, needed = [], [], set()
  for source in sources:
    expected = source.layout.hf_shape(source.layer_shape)
    for name in source.hf_names():
      needed.add(name)
      if name not in checkpoint.file_names:
        missing.append(f"{name} (for parameter {source.path})")
      elif checkpoint.shape(name) != expected:
        mismatched.append(f"{checkpoint.file_names[name]}: shape {list(checkpoint.shape(name))} in the checkpoint, "
                          f"the model needs {list(expected)} (parameter {source.path}{list(source.shape)})")
  if missing:
    raise ValueError(_problems(f"{checkpoint.directory}: tensors missing from the checkpoint (named as "
                               f"transformers 4 writes them)", missing))
  if mismatched:
    raise ValueError(_problems(f"{checkpoint.directory}: tensors whose shape differs from the config's", mismatched))
  left_over = [checkpoint.file_names[name] for name in sorted(checkpoint.file_names)
               if name not in needed and not (tie_embeddings and name == LM_HEAD)
               and not any(pattern.search(name) for pattern in UNUSED)]
  if left_over:
    raise ValueError(_problems(f"{checkpoint.directory}: tensors the model has no parameter for (a different "
                               f"architecture or config?)", left_over))
  embedding = TEXT + "embed_tokens.weight"
  if tie_embeddings and LM_HEAD in checkpoint.file_names:
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      head, table = (np.asarray(checkpoint.slice(name)[:]) for name in (LM_HEAD, embedding))
    if head.shape != table.shape or not np.array_equal(head, table):
      raise ValueError(f"{checkpoint.directory}: the config ties the output head to the embeddings "
                       f"(tie_word_embeddings) but {checkpoint.file_names[LM_HEAD]} differs from "
                       f"{checkpoint.file_names[embedding]}")


def load_params(directory: str, model_config: VLMConfig, mesh: jax.sharding.Mesh | None = None,
                rules: mesh_lib.Rules | None = None) -> Any:
  """The `params` tree of VLM(model_config), float32, read from the directory's safetensors.

  With `mesh` and `rules`, every parameter is created in its sharding (`param_shardings`) by
  `jax.make_array_from_callback`: each device reads only its block from the files. Without, plain arrays on the
  default device.
  """
  boxed = jax.eval_shape(VLM(model_config).init, jax.random.key(0), **model_config.example_inputs(1))
  abstract = nn.meta.unbox(boxed)["params"]
  sources = plan(abstract)
  shardings = None
  if mesh is not None:
    rules = mesh_lib.normalize_rules(rules)
    shardings = jax.tree_util.tree_leaves(mesh_lib.param_shardings(boxed, mesh, rules)["params"])
  with Checkpoint(directory) as checkpoint:
    check(checkpoint, sources, model_config.decoder.tie_embeddings)
    leaves = []
    for i, source in enumerate(sources):
      if shardings is None:
        leaves.append(jnp.asarray(checkpoint.read(source, tuple(slice(None) for _ in source.shape))))
      else:
        leaves.append(_sharded(checkpoint, source, shardings[i]))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def _sharded(checkpoint: Checkpoint, source: Source, sharding: jax.sharding.Sharding) -> jax.Array:
  """One parameter made in its sharding; a block several devices hold (replicas) is read once."""
  blocks = {}

  def block(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop) for s in index)
    if key not in blocks:
      blocks[key] = checkpoint.read(source, index)
    return blocks[key]

  return jax.make_array_from_callback(source.shape, sharding, block)


def iter_hf_tensors(params: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(canonical HF name, float32 tensor) for every parameter of a `params` tree of VLM."""
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)
  for source, value in zip(plan(abstract), jax.tree_util.tree_leaves(params)):
    value = np.asarray(jax.device_get(value), np.float32)
    for i, name in enumerate(source.hf_names()):
      yield name, source.layout.to_hf(value[i] if source.stacked else value)


def saved_name(canonical: str, renames: tuple[tuple[str, str], ...]) -> str:
  """A canonical name as the layout of `renames` ((its prefix, canonical prefix) pairs, as RENAMES holds them) names
  it: the first pair whose canonical prefix it has, read backwards; unchanged where none has."""
  for prefix, canonical_prefix in renames:
    if canonical.startswith(canonical_prefix):
      return prefix + canonical[len(canonical_prefix):]
  return canonical


def save_params(path: str, params: Any, clip_post_norm_width: int | None,
                renames: tuple[tuple[str, str], ...] = ()) -> None:
  """Writes `params` as one safetensors file, in the canonical layout or, with `renames` (QWEN_SAVED), in the one
  those renames read. `clip_post_norm_width`: write an identity CLIP post-LayerNorm of this width (transformers'
  CLIPVisionModel has one; LLaVA never uses it, and our ViT only creates it when it is used)."""
  tensors = dict(iter_hf_tensors(params))
  if clip_post_norm_width is not None and VISION + "post_layernorm.weight" not in tensors:
    tensors[VISION + "post_layernorm.weight"] = np.ones(clip_post_norm_width, np.float32)
    tensors[VISION + "post_layernorm.bias"] = np.zeros(clip_post_norm_width, np.float32)
  tensors = {saved_name(name, renames): tensor for name, tensor in tensors.items()}
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
