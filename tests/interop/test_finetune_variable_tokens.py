"""Finetuning LLaVA-NeXT and Qwen2.5-VL as a user does: `configs/from_hf.py:DIR` on tiny directories that
transformers wrote, test_finetune.py's LLaVA instruction JSON (images of several sizes, bad rows among them), full
finetuning and LoRA. The loss falls, a killed run resumes with the same losses, `vlmjax.load(workdir)` generates,
a lora run exports its adapters for PEFT, and the batches take few shapes (the train step compiles once per bucket,
not per batch)."""

import os

import jax
import numpy as np
import pytest

import vlmjax
from configs import from_hf
from test_finetune import STEPS, _config, _killed_after_half, _losses, data  # noqa: F401 (data: a fixture)
from test_hf_training import write_variable_checkpoint
from vlmjax import api, cli, workdir as workdir_lib
from vlmjax.data import sources
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.data.variable_images import VariableImages
from vlmjax.interop import hf, peft as peft_export
from vlmjax.models.vlm import Patches, Tiles, VLMConfig
from vlmjax.train import memory, trainer

# Tokens per row: a LLaVA-NeXT image of the test's sizes takes up to 16 + 8 x 9 tokens, a Qwen2.5-VL one up to 20.
LENGTH = {"llava_next": 128, "qwen2_5_vl": 64}
# Qwen2-VL trains through the same stages as Qwen2.5-VL; its tower's gradients are test_hf_training's.
VARIABLE_CASES = list(LENGTH)


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
  """directory(name) -> a VARIABLE_CASES checkpoint's directory, written once per module."""
  written = {}

  def get(name: str) -> str:
    if name not in written:
      written[name] = str(tmp_path_factory.mktemp(name))
      write_variable_checkpoint(name, written[name])
    return written[name]

  return get


@pytest.mark.parametrize("name, stage", [(name, stage) for name in VARIABLE_CASES for stage in ("finetune", "lora")])
def test_finetuning_learns_resumes_and_loads(directory, data, tmp_path, name, stage):  # noqa: F811
  base_dir = directory(name)
  # Adapters starting at zero learn at a larger rate, as LLaVA's LoRA recipe trains them (2e-4 against 2e-5).
  config = _config(base_dir, data, **{"train.stages": stage, "data.length": LENGTH[name],
                                      "optim.learning_rate": 2e-2 if stage == "lora" else 3e-3})
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir)
  losses = _losses(workdir)
  assert list(losses) == list(range(1, STEPS + 1))
  assert np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)]) < 0.7 * np.mean([losses[s] for s in (1, 2, 3)])
  assert workdir_lib.read_metrics(workdir)[-1]["examples_skipped"] > 0  # the bad rows were skipped

  _killed_after_half(workdir)
  trainer.train(config, workdir)
  resumed = _losses(workdir)
  np.testing.assert_allclose([resumed[s] for s in losses], list(losses.values()), rtol=1e-5)

  vlm = vlmjax.load(workdir)
  replies = vlm.generate([np.zeros((24, 40, 3), np.uint8), np.zeros((50, 20, 3), np.uint8)],
                         ["What is in the picture?"] * 2, max_new_tokens=4)
  assert all(isinstance(reply, str) for reply in replies)
  base = vlmjax.load(base_dir)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), vlm.params, base.params)
  projector = ({key: value for key, value in changed["vision"].items() if key.startswith("merger_")}
               if name == "qwen2_5_vl" else changed["projector"])
  assert all(jax.tree.leaves(projector)) and any(jax.tree.leaves(changed["decoder"]))
  tower = {key: value for key, value in changed["vision"].items() if not key.startswith("merger_")}
  assert not any(jax.tree.leaves(tower))  # frozen in both stages
  if name == "llava_next":  # trained with the language model, frozen under LoRA (LLaVA-NeXT's recipes)
    assert changed["image_newline"] == (stage == "finetune")
  if stage == "lora":  # its checkpoints hold the adapters and the projector (Qwen's merger), nothing else
    trained, _ = api.lora_trained(workdir)
    adapter_keys = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(trained["decoder"])}
    assert adapter_keys == {"lora_a", "lora_b"}
    assert sorted(trained) == ["decoder", "vision" if name == "qwen2_5_vl" else "projector"]
    out = str(tmp_path / "adapters")  # in PEFT's layout (its logits against peft's: test_peft.py)
    assert "for PEFT" in cli.export_checkpoint(workdir, out, adapters=True)
    assert os.path.isfile(os.path.join(out, peft_export.WEIGHTS_FILE))


@pytest.mark.parametrize("name", VARIABLE_CASES)
def test_batches_take_few_shapes(directory, data, name):  # noqa: F811
  """20 batches of images of several sizes: rows with their own image token counts, and every batch's arrays in one
  of at most two shapes (the tiles or windows bucketed, token tables as long as the rows)."""
  base_dir = directory(name)
  model_config = VLMConfig.from_dict(hf.read_config(base_dir).config.model)
  inputs = sources.ModelInputs(Tokenizer.from_directory(base_dir), ImageProcessor.from_directory(base_dir),
                               model_config.image_token_id, None, prefix_lm=False, max_length=LENGTH[name],
                               variable_images=VariableImages(model_config))
  dataset = sources.train_dataset(sources.parse_sources(data), inputs, seed=0, batch_size=4, length=LENGTH[name],
                                  prefetch=0)
  shapes, counts = set(), set()
  for _, batch in zip(range(20), iter(dataset)):
    images = batch["pixel_values"]
    assert isinstance(images, Patches if name == "qwen2_5_vl" else Tiles)
    assert images.token_index.shape == (4, LENGTH[name])
    shapes.add(tuple(np.shape(leaf) for leaf in jax.tree.leaves(batch)))
    counts |= set((batch["input_ids"] == model_config.image_token_id).sum(axis=1).tolist())
  print(f"{name}: image tokens a row {sorted(counts)}, {len(shapes)} batch shapes")
  assert len(counts) >= 3  # text-only rows and images of at least two token counts
  assert len(shapes) <= 2, shapes
  with pytest.raises(ValueError, match="packing is not supported for models whose images give a token count each"):
    sources.train_dataset(sources.parse_sources(data), inputs, seed=0, batch_size=4, length=LENGTH[name],
                          packing=True)


@pytest.mark.parametrize("name", VARIABLE_CASES)
def test_summarize_counts_what_each_stage_trains(directory, name):
  """`vlmjax summarize`'s footprint runs for these families (their images as Tiles / Patches), and the finetune
  stage trains the language model (LLaVA-NeXT's image_newline with it) and the projector (Qwen's patch merger)."""
  config = from_hf.get_config(directory(name))
  config.data.length, config.train.batch_size = LENGTH[name], 2
  params = hf.load_pretrained(directory(name)).params
  size = lambda tree: sum(np.size(leaf) for leaf in jax.tree.leaves(tree))
  parts = ({key: value for key, value in params["vision"].items() if key.startswith("merger_")}
           if name == "qwen2_5_vl" else [params["projector"], params["image_newline"]])
  finetune = memory.footprint(config, 1, "finetune", "finetune")
  assert finetune.trained == size(params["decoder"]) + size(parts)
  assert memory.footprint(config, 1, "full", "full").trained == size(params)
  assert finetune.activations > 0
