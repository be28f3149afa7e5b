"""Training numerics against transformers: for an imported LLaVA / PaliGemma / LLaVA-NeXT / Qwen2.5-VL / Qwen2-VL
checkpoint (tiny, random, written by transformers), the loss of a batch and the gradient of every parameter equal
transformers' on the same batch with the same labels, in float32 (relative 1e-5).

One batch per case: two rows of different lengths (right-padded), an image each, the loss on the answer tokens.
PaliGemma trains as its processor sets it up for transformers: the prefix (image tokens, BOS, prompt, "\\n") has
token_type_ids 0 and no labels, the suffix (answer, EOS) token_type_ids 1 and the labels. PaliGemmaModel makes the
token_type_ids-0 tokens one bidirectional block (`block_sequence_ids`) on top of the causal mask: that is our
`prefix_lengths`. Our side runs as the trainer does: `state.stage_loss` of the "full" stage (`vlm_loss`), with the
default backward passes (the CPU-tuned ones on a CPU).

LLaVA-NeXT, Qwen2.5-VL and Qwen2-VL (images at their own size, a token count each): the batch is the trainer's,
made by the data pipeline (`sources` renders each conversation with the chat template, `VariableImages.collate` lays
out the `Tiles` or `Patches`), two rows with images of different sizes and aspect ratios; transformers gets the same
ids and the same processed images (LLaVA-NeXT's tiles padded per row with `image_sizes`, Qwen's patches with
`image_grid_thw`). Qwen2.5-VL's tower has window and full-attention blocks, Qwen2-VL's (LayerNorm, plain MLP) full
attention in every block; both decoders M-RoPE.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

# The other test modules' helpers (pytest puts tests/interop on sys.path: it has no __init__.py).
import test_llava_next
import test_qwen2_5_vl
from test_hf import _prompt_ids, max_relative_error
from variable_tokens import images_of
from vlmjax.data import pipeline, sources
from vlmjax.data.variable_images import VariableImages
from vlmjax.interop import hf, hf_weights
from vlmjax.models import layers
from vlmjax.models.vlm import VLMConfig
from vlmjax.train import state

# LLaVA with GQA, an untied head and the features of the ViT's next-to-last layer (its last layer is out of the
# loss's reach); PaliGemma with GQA, the tied head and the prefix-LM.
CASE_NAMES = ["llava_gqa", "paligemma_gqa_sharded"]
# Images at their own size: LLaVA-NeXT (Llama), Qwen2.5-VL and Qwen2-VL (written by their test modules), a landscape
# and a portrait image (other pinpoints, other patch grids).
VARIABLE_CASES = ["llava_next", "qwen2_5_vl", "qwen2_vl"]
VARIABLE_SIZES = [(37, 52), (61, 29)]
# (prompt, answer) per row; the loss counts the answer and the EOS after it.
ROWS = [("What is in the picture?", "A red circle next to a blue square."),
        ("Describe the image in detail, please. How many shapes are there?", "caption")]
TOLERANCE = 1e-5
# A key projection's bias has no gradient: it adds q·b to every score of a query's row, which the softmax ignores.
# Both sides give rounding noise for it (1e-10 to 1e-9, against 1e-3 to 1e-1 for the layer's other gradients), so
# its error is measured against the scale of the gradients that reach the keys: the same layer's key kernel's.
KEY_BIAS = re.compile(r"self_attn\.k_proj\.bias$")
EMBEDDING = hf_weights.TEXT + "embed_tokens.weight"


def make_batch(pretrained: hf.Pretrained, pixel_values: np.ndarray) -> tuple[dict, dict]:
  """The same batch for both sides: (ours, as the trainer's data pipeline makes it; transformers' keyword
  arguments, labels -100 outside the answers)."""
  eos = pretrained.tokenizer.eos_token_id
  rows = [(_prompt_ids(pretrained, prompt), pretrained.tokenizer.encode(answer, add_special_tokens=False) + [eos])
          for prompt, answer in ROWS]
  lengths = [len(prompt) + len(answer) for prompt, answer in rows]
  assert len(set(lengths)) == len(rows), f"rows of one length {lengths}: the padding would not be exercised"
  length = max(lengths)
  examples, their_ids, labels = [], [], []
  for (prompt, answer), pixels in zip(rows, pixel_values):
    ids = np.asarray(prompt + answer)
    is_answer = np.arange(len(ids)) >= len(prompt)
    examples.append(pipeline.example_arrays(ids, is_answer, pixels))
    pad = (0, length - len(ids))
    their_ids.append(np.pad(ids, pad, constant_values=pretrained.pad_token_id))
    labels.append(np.pad(np.where(is_answer, ids, -100), pad, constant_values=-100))
  ours = pipeline.pad_batch(examples, length)
  theirs = {"input_ids": torch.tensor(np.stack(their_ids)), "labels": torch.tensor(np.stack(labels)),
            "attention_mask": torch.tensor(ours["input_mask"], dtype=torch.long),
            "pixel_values": torch.tensor(pixel_values.transpose(0, 3, 1, 2))}
  if pretrained.prefix_lm:
    prefix_lengths = np.asarray([len(prompt) for prompt, _ in rows], np.int32)
    ours["prefix_lengths"] = prefix_lengths
    # 1 on the suffix and on the padding (whose keys the attention mask hides either way).
    theirs["token_type_ids"] = torch.tensor(np.arange(length)[None] >= prefix_lengths[:, None], dtype=torch.long)
  return ours, theirs


@dataclasses.dataclass(frozen=True)
class Gradients:
  """One case's loss and gradients on both sides, gradients by canonical Hugging Face name (`hf_weights`)."""

  case_name: str
  model_config: VLMConfig
  our_loss: float
  their_loss: float
  their_causal_loss: float | None  # PaliGemma's without token_type_ids: a causal prefix
  ours: dict[str, np.ndarray]
  theirs: dict[str, np.ndarray | None]  # None where transformers' autograd does not reach the parameter

  def __repr__(self) -> str:  # what pytest shows of the fixture when a test fails
    return f"Gradients({self.case_name})"


def make_variable_batch(pretrained: hf.Pretrained, images: list[np.ndarray]) -> tuple[dict, dict]:
  """`make_batch` for LLaVA-NeXT and Qwen2.5-VL, row i a conversation about images[i]: ours as the trainer's data
  pipeline makes it, transformers' from the same ids, loss mask and processed images."""
  model_config = VLMConfig.from_dict(pretrained.config.model)
  variable = VariableImages(model_config)
  inputs = sources.ModelInputs(pretrained.tokenizer, pretrained.image_processor, pretrained.image_token_id, None,
                               prefix_lm=False, max_length=1024, variable_images=variable)
  examples = [sources._Examples(inputs).chat([image], [
      {"role": "user", "content": f"{sources.IMAGE_TAG}\n{prompt}"}, {"role": "assistant", "content": answer}])
              for (prompt, answer), image in zip(ROWS, images)]
  lengths = [len(example["input_ids"]) for example in examples]
  assert len(set(lengths)) == len(examples), f"rows of one length {lengths}: the padding would not be exercised"
  ours = variable.collate(examples, max(lengths) + 3)
  ids = np.where(ours["input_mask"], ours["input_ids"], pretrained.pad_token_id)
  trained = np.pad(ours["loss_mask"][:, :-1], ((0, 0), (1, 0))) > 0  # loss_mask[t] weighs token t + 1
  ids = ids.astype(np.int64)
  theirs = {"input_ids": torch.tensor(ids), "labels": torch.tensor(np.where(trained, ids, -100)),
            "attention_mask": torch.tensor(ours["input_mask"], dtype=torch.long)}
  processed = [example["pixel_values"][0] for example in examples]  # (tiles or patches, size or grid) per row
  if model_config.qwen_tower:
    vision = model_config.vision  # Qwen2.5-VL: windowed and full-attention blocks, over images of several windows
    assert vision.full_attention_only or 0 < len(vision.fullatt_block_indexes) < vision.depth
    assert all(max(grid[1:]) // vision.merge_size > vision.window_units for _, grid in processed)
    theirs["pixel_values"] = torch.tensor(np.concatenate([patches for patches, _ in processed]))
    theirs["image_grid_thw"] = torch.tensor([grid for _, grid in processed])
    theirs["mm_token_type_ids"] = (theirs["input_ids"] == pretrained.image_token_id).int()
  else:
    most = max(len(tiles) for tiles, _ in processed)
    theirs["pixel_values"] = torch.tensor(np.stack([np.pad(tiles, ((0, most - len(tiles)),) + ((0, 0),) * 3)
                                                    for tiles, _ in processed]).transpose(0, 1, 4, 2, 3))
    theirs["image_sizes"] = torch.tensor([size for _, size in processed])
  return ours, theirs


def write_variable_checkpoint(name: str, directory: str):
  """Writes a VARIABLE_CASES checkpoint (or Qwen2-VL's, test_peft's) as its test module does; returns the torch
  model."""
  if name in ("qwen2_5_vl", "qwen2_vl"):
    return test_qwen2_5_vl._write(directory, tie=False, family=name)
  return test_llava_next._write(test_llava_next.BACKBONES["llama"], "llama", directory)


@pytest.fixture(scope="module")
def variable_checkpoint(tmp_path_factory):
  """variable_checkpoint(name) -> (directory, torch model) of a VARIABLE_CASES checkpoint, written once per module."""
  written = {}

  def get(name: str):
    if name not in written:
      directory = str(tmp_path_factory.mktemp(name))
      written[name] = directory, write_variable_checkpoint(name, directory)
    return written[name]

  return get


@pytest.fixture(scope="module", params=CASE_NAMES + VARIABLE_CASES)
def gradients(request, checkpoint, variable_checkpoint) -> Gradients:
  """Both sides' loss and gradients on one batch, computed once per case."""
  if request.param in VARIABLE_CASES:
    directory, model = variable_checkpoint(request.param)
    pretrained = hf.load_pretrained(directory)
    ours, theirs = make_variable_batch(pretrained, images_of(VARIABLE_SIZES))
  else:
    _, directory, model = checkpoint(request.param)
    pretrained = hf.load_pretrained(directory)
    size = VLMConfig.from_dict(pretrained.config.model).vision.image_size
    pixel_values = np.random.default_rng(0).normal(size=(len(ROWS), size, size, 3)).astype(np.float32)
    ours, theirs = make_batch(pretrained, pixel_values)
  model_config = VLMConfig.from_dict(pretrained.config.model)

  loss_fn = lambda params, batch: state.stage_loss(params, model_config, batch, "full")[0]  # the trainer's
  with jax.default_matmul_precision("highest"):  # float32 matmuls on accelerators too (no TF32 / bf16 passes)
    our_loss, our_grads = jax.jit(jax.value_and_grad(loss_fn))(pretrained.params, jax.tree.map(jnp.asarray, ours))

  model.zero_grad(set_to_none=True)
  their_loss = model(**theirs).loss
  their_loss.backward()
  their_grads = {hf_weights.canonical_name(name): None if p.grad is None else p.grad.numpy().copy()
                 for name, p in model.named_parameters()}  # tied weights appear once, their gradients summed
  model.zero_grad(set_to_none=True)  # the session's model is test_hf.py's too
  causal_loss = None
  if pretrained.prefix_lm:
    with torch.no_grad():
      causal_loss = float(model(**{k: v for k, v in theirs.items() if k != "token_type_ids"}).loss)
  ours = dict(hf_weights.iter_hf_tensors(layers.stack_layers(our_grads)))
  # transformers' text embedding takes padding_idx=pad_token_id, and nn.Embedding never gives that row a gradient.
  # Qwen's tiny tokenizer maps what it does not know (the template's line breaks) to its pad token, so the row is in
  # the text, where ours trains it as any token's: it is left out of the comparison on both sides.
  pad_row = model.get_input_embeddings().padding_idx
  if pad_row is not None and np.any(theirs["input_ids"].numpy()[theirs["attention_mask"].numpy() > 0] == pad_row):
    for grads in (ours, their_grads):
      grads[EMBEDDING] = np.delete(grads[EMBEDDING], pad_row, axis=0)
  return Gradients(request.param, model_config, float(our_loss), float(their_loss.detach()), causal_loss, ours,
                   their_grads)


def test_loss_matches_transformers(gradients):
  error = abs(gradients.our_loss - gradients.their_loss) / abs(gradients.their_loss)
  print(f"{gradients.case_name}: loss {gradients.our_loss:.6f}, relative error {error:.1e}")
  assert error <= TOLERANCE, (gradients.our_loss, gradients.their_loss)
  if gradients.their_causal_loss is not None:  # the bidirectional prefix changes the loss far more than the tolerance
    assert abs(gradients.their_causal_loss - gradients.their_loss) > 100 * TOLERANCE * gradients.their_loss


def test_every_gradient_matches_transformers(gradients):
  ours, theirs = gradients.ours, gradients.theirs
  reached = {name for name, grad in theirs.items() if grad is not None}
  assert reached <= set(ours), f"transformers' gradients with no parameter of ours: {sorted(reached - set(ours))}"
  errors = {}
  for name in sorted(reached):
    assert ours[name].shape == theirs[name].shape, (name, ours[name].shape, theirs[name].shape)
    if KEY_BIAS.search(name):
      scale = np.abs(theirs[name.replace(".bias", ".weight")]).max()
      errors[name] = float(np.abs(ours[name] - theirs[name]).max() / scale)
    else:
      errors[name] = max_relative_error(ours[name], theirs[name])
  worst = max(errors, key=errors.get)
  print(f"{gradients.case_name}: {len(errors)} gradients, max relative error {errors[worst]:.1e} ({worst})")
  assert all(error <= TOLERANCE for error in errors.values()), {n: e for n, e in errors.items() if e > TOLERANCE}


def test_parameters_out_of_the_losss_reach_have_no_gradient(gradients):
  """Those of LLaVA's ViT above its feature layer (and CLIP's post-LayerNorm, which vlmjax does not create): no
  gradient in transformers, zeros in ours, and every gradient of ours compared either way."""
  ours, theirs, model_config = gradients.ours, gradients.theirs, gradients.model_config
  unreached = {name for name, grad in theirs.items() if grad is None}
  expected = set()
  if model_config.vision_feature_layer is not None:  # hidden state i is the output of layer i - 1 (0: embeddings)
    depth = model_config.vision.depth
    above_features = range(model_config.vision_feature_layer % (depth + 1), depth)
    expected = {name for name in theirs if name.startswith(hf_weights.VISION + "post_layernorm.")
                or any(name.startswith(f"{hf_weights.VISION}encoder.layers.{i}.") for i in above_features)}
  assert unreached == expected
  assert set(ours) <= set(theirs)
  for name in sorted(unreached & set(ours)):
    assert not np.any(ours[name]), name

