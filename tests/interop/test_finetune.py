"""Finetuning Hugging Face checkpoints as a user does: `configs/from_hf.py:DIR` on tiny LLaVA-1.5 and PaliGemma
directories that transformers wrote, a LLaVA instruction JSON and images written here (bad rows among them), full
finetuning, LoRA and QLoRA. The loss falls, a killed run resumes with the same losses, bad rows are skipped and
counted, and `vlmjax.load(workdir)` generates."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import vlmjax
from configs import from_hf
from vlmjax import api, workdir as workdir_lib
from vlmjax.train import trainer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
  """data.sources of a LLaVA instruction JSON: one question about each solid-colour image (answer: its colour),
  a text-only row, and three bad rows (a missing image, no assistant turn, two <image> tags for one image)."""
  root = tmp_path_factory.mktemp("llava_data")
  images = root / "images"
  images.mkdir()
  rows = []
  for i, (name, rgb) in enumerate(COLOURS.items()):
    Image.new("RGB", (30 + 7 * i, 24), rgb).save(images / f"{name}.png")
    rows.append({"id": name, "image": f"{name}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": name}]})
  rows.append({"id": "text", "conversations": [{"from": "human", "value": "Describe the image in detail, please."},
                                               {"from": "gpt", "value": "The quick brown fox."}]})
  rows += [{"id": "missing", "image": "nowhere.png", "conversations": rows[0]["conversations"]},
           {"id": "unanswered", "image": "red.png", "conversations": rows[0]["conversations"][:1]},
           {"id": "two_tags", "image": "red.png", "conversations": [
               {"from": "human", "value": "<image> <image> What is in the picture?"}, {"from": "gpt", "value": "red"}]}]
  path = root / "llava.json"
  path.write_text(json.dumps(rows))
  return f"llava:{path}:{images}"


def _config(directory: str, data: str, **overrides):
  config = from_hf.get_config(directory)
  config.data.sources = data
  config.data.length = 48
  config.train.update(steps=STEPS, batch_size=8, checkpoint_every=STEPS // 2, log_every=1)  # a row per test device
  config.optim.update(learning_rate=3e-3, warmup_steps=2)
  config.lora.update(rank=4, alpha=8.0, dropout=0.0)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _losses(workdir) -> dict[int, float]:
  return {row["step"]: row["loss"] for row in workdir_lib.read_metrics(workdir)}


def _killed_after_half(workdir) -> None:
  """The workdir as a run killed after its middle checkpoint leaves it: the last checkpoint and the metrics after
  the middle gone."""
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  rows = [row for row in workdir_lib.read_metrics(workdir) if row["step"] <= STEPS // 2]
  with open(os.path.join(workdir, workdir_lib.METRICS_FILE), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("name, overrides", [
    ("llava_gqa", {"train.stages": "finetune"}),
    # Adapters starting at zero learn at a larger rate, as LLaVA's LoRA recipe trains them (2e-4 against 2e-5).
    ("llava_gqa", {"train.stages": "lora", "optim.learning_rate": 2e-2}),
    ("paligemma_mqa", {"train.stages": "lora", "lora.quantize": "int4:16", "model.dtype": "bfloat16",
                       "optim.learning_rate": 2e-2}),
], ids=["llava-finetune", "llava-lora", "paligemma-qlora-int4"])
def test_finetuning_learns_resumes_and_loads(checkpoint, data, tmp_path, name, overrides):
  _, directory, _ = checkpoint(name)
  config = _config(directory, data, **overrides)
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir)
  losses = _losses(workdir)
  assert list(losses) == list(range(1, STEPS + 1))
  assert np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)]) < 0.7 * np.mean([losses[s] for s in (1, 2, 3)])
  rows = workdir_lib.read_metrics(workdir)
  assert rows[-1]["examples_skipped"] > 0  # the bad rows were skipped, and the run went on

  _killed_after_half(workdir)
  trainer.train(config, workdir)
  resumed = _losses(workdir)
  np.testing.assert_allclose([resumed[s] for s in losses], list(losses.values()), rtol=1e-5)

  vlm = vlmjax.load(workdir)
  reply = vlm.generate([np.zeros((24, 24, 3), np.uint8)], ["What is in the picture?"], max_new_tokens=4)
  assert isinstance(reply[0], str)
  base = vlmjax.load(directory)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), vlm.params, base.params)
  assert changed["projector"] and any(jax.tree.leaves(changed["decoder"]))
  assert not any(jax.tree.leaves(changed["vision"]))  # frozen in both stages
  if config.train.stages == "lora":  # its checkpoints hold the adapters and the projector, nothing of the base
    trained, _ = api.lora_trained(workdir)
    assert sorted(trained) == ["decoder", "projector"]
    assert {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(trained["decoder"])} == {"lora_a", "lora_b"}
