"""`vlmjax train` end to end, as users run it: in fresh processes, on a tiny shapes data set (`trainer_runs`).
The runs compared across meshes and processes are in test_trainer_sharded.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import trainer_runs as runs

# The reference run: the config's stages (classify, then finetune), checkpoints on the way, validation at the end.
REFERENCE = ("--config.train.steps=10", "--config.train.checkpoint_every=4")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_flags):
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, runs.train(workdir, data_flags, *REFERENCE)


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run[1]


def test_a_run_killed_mid_way_resumes_to_the_same_losses(tmp_path, data_flags, reference):
  command = runs.command(tmp_path, data_flags, *REFERENCE)
  process = subprocess.Popen(command, env=runs.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until step 6 is logged: one checkpoint (step 4) behind it
    if os.path.exists(tmp_path / "metrics.jsonl") and max(runs.losses(tmp_path), default=0) >= 6:
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(runs.losses(tmp_path)) < 10, "the run finished before it was killed"
  resumed = runs.train(tmp_path, data_flags, *REFERENCE)
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=1e-6)


def test_a_different_config_refuses_to_resume_and_names_the_keys(tmp_path, data_flags, reference_run):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))
  result = subprocess.run(runs.command(workdir, data_flags, *REFERENCE, "--config.optim.learning_rate=0.5"),
                          env=runs.env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  from configs import shapes_tiny
  assert f"optim.learning_rate: {shapes_tiny.get_config().optim.learning_rate} -> 0.5" in result.stderr
  assert "--allow_config_change" in result.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints


@pytest.mark.parametrize("flag,message", [
    ("--config.train.stages=pretrain", "unknown training stage 'pretrain'"),
    ("--config.train.init_from=/nonexistent/run", "train.init_from='/nonexistent/run' does not exist"),
    ("--config.classify.optimizer=sgd", "optim.optimizer='sgd' is not one of"),
])
def test_bad_stage_or_checkpoint_fails_before_any_work(tmp_path, data_flags, flag, message):
  result = subprocess.run(runs.command(tmp_path, data_flags, flag), env=runs.env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and message in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_the_trained_workdir_serves_generate_and_eval(reference_run, tiny_shapes_dir, tmp_path):
  """`vlmjax generate` and `vlmjax eval` read the workdir as `vlmjax.load` does; the run logged its validation."""
  workdir, _ = reference_run
  result = runs.generate(workdir, tiny_shapes_dir, tmp_path, max_new_tokens=4)
  assert result.returncode == 0, result.stderr[-2000:]
  out = tmp_path / "results.json"
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "eval", "--workdir", str(workdir), "--out", str(out),
                           "--benchmarks", "shapes_vqa,shapes_pope"], env=runs.env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads(out.read_text())
  assert 0.0 <= results["shapes_vqa"]["accuracy"] <= 1.0 and "random/f1" in results["shapes_pope"]
  assert (tmp_path / "predictions" / "shapes_vqa.jsonl").exists()
  # The regression gate: against its own results nothing fell; against a better baseline it exits 1 and names
  # what fell (the answers come from the predictions just written: nothing is generated again).
  command = [sys.executable, "-m", "vlmjax.cli", "eval", "--workdir", str(workdir), "--out", str(out),
             "--benchmarks", "shapes_vqa,shapes_pope", "--max_drop", "0.01"]
  baseline = tmp_path / "baseline.json"
  baseline.write_text(json.dumps(results))
  result = subprocess.run(command + ["--baseline", str(baseline)], env=runs.env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and "no metric fell" in result.stderr, result.stderr[-2000:]
  better = {**results, "shapes_vqa": {**results["shapes_vqa"], "accuracy": results["shapes_vqa"]["accuracy"] + 0.05}}
  baseline.write_text(json.dumps(better))
  result = subprocess.run(command + ["--baseline", str(baseline)], env=runs.env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "1 metrics fell by more than 0.01" in result.stderr and "shapes_vqa accuracy:" in result.stderr
  last = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert last["step"] == 10 and "validation/accuracy" in last and os.path.exists(workdir / "learning_curve.png")


@pytest.mark.parametrize("stage,own_groups", [("contrastive", {"text", "image_projection", "logit_bias"}),
                                              ("classify", {"head", "classifier"})])
def test_a_stage_after_a_vision_pretraining_stage_starts_from_its_vision_tower(tmp_path, data_flags, stage,
                                                                               own_groups):
  """contrastive or classify -> align: align freezes the vision tower, so the VLM's must be the pretraining
  model's, bit for bit."""
  import orbax.checkpoint as ocp

  losses = runs.train(tmp_path, data_flags, "--config.train.steps=4",
                      f"--config.train.stages={stage}:0.5,align:0.5", f"--config.{stage}.batch_size=8",
                      "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3",
                      "--config.train.validation_questions=0")
  assert sorted(losses) == [1, 2, 3, 4]
  checkpointer = ocp.PyTreeCheckpointer()
  pretrained = checkpointer.restore(tmp_path / "checkpoints" / "2" / "state")["params"]
  vlm = checkpointer.restore(tmp_path / "checkpoints" / "4" / "state")["params"]
  assert own_groups | {"vision"} == set(pretrained) - {"text_projection", "log_temperature"}
  assert set(vlm) == {"vision", "projector", "decoder"}
  import jax
  for trained, kept in zip(jax.tree.leaves(pretrained["vision"]), jax.tree.leaves(vlm["vision"]), strict=True):
    np.testing.assert_array_equal(trained, kept)
  # ... and the pretraining stage did train it: it moved away from the run's initialization (seed 0).
  import flax.linen as nn

  from configs import shapes_tiny
  from vlmjax.models.vlm import VLM, VLMConfig
  config = shapes_tiny.get_config()
  for key, value in runs.ONE_LAYER.items():
    config.update_from_flattened_dict({key: value})
  vlm_config = VLMConfig.from_dict(config.model)
  initial = nn.meta.unbox(VLM(vlm_config).init(jax.random.key(0), **vlm_config.example_inputs(1)))["params"]
  assert not np.allclose(initial["vision"]["patch_embedding"]["kernel"], vlm["vision"]["patch_embedding"]["kernel"])
