"""`vlmjax train` end to end, as users run it: in fresh processes, on a tiny shapes data set."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


STEPS = ["--config.train.log_every=1", "--config.train.batch_size=8", "--config.data.length=96",
         "--config.optim.warmup_steps=2"]
# One layer per tower: what these tests check does not depend on depth, and each run compiles in half the time.
ONE_LAYER = {"model.vision.depth": 1, "model.decoder.depth": 1, "contrastive.text.depth": 1}
# The runs compared across meshes and processes: 3 steps of the stage that trains every group, one checkpoint at
# the end, no validation (one program to compile per run). They compute in float32: the config's bfloat16
# language model sums in another order on each mesh and differs by more than the 1e-4 these comparisons hold
# float32 to.
COMPARED = ("--config.train.steps=3", "--config.train.stages=full", "--config.train.checkpoint_every=3",
            "--config.train.validation_questions=0", "--config.model.dtype=float32")


@pytest.fixture(scope="module")
def data_flags(tiny_shapes_dir, tiny_shapes_splits):
  """The flags that point a run at the session's tiny shapes data set (built with these splits)."""
  return [f"--config.data.dir={tiny_shapes_dir}"] + [f"--config.data.shapes.splits.{split}={size}"
                                                     for split, size in tiny_shapes_splits.items()]


@pytest.fixture(scope="module")
def shapes_dir(tiny_shapes_dir):
  return tiny_shapes_dir


def _command(workdir, data_flags, *flags, cpu_devices=0):
  """The run's command line; its devices are XLA_FLAGS' (`_env`) unless cpu_devices splits the CPU."""
  return [sys.executable, "-m", "vlmjax.cli", "train", "--config", "configs/shapes_tiny.py", "--workdir",
          str(workdir), *data_flags, *STEPS, *(f"--config.{key}={value}" for key, value in ONE_LAYER.items()),
          f"--config.cpu_devices={cpu_devices}", *flags]


def _env(devices=1, **extra):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  env.update(extra)
  return env


def _losses(workdir) -> dict[int, float]:
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row["loss"]  # a resumed run re-logs steps: the last row wins
  return rows


def _train(workdir, data_flags, *flags, devices=1, cpu_devices=0):
  result = subprocess.run(_command(workdir, data_flags, *flags, cpu_devices=cpu_devices), env=_env(devices),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return _losses(workdir)


# The reference run: the config's stages (classify, then finetune), checkpoints on the way, validation at the end.
REFERENCE = ("--config.train.steps=10", "--config.train.checkpoint_every=4")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_flags):
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, _train(workdir, data_flags, *REFERENCE)


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run[1]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, data_flags):
  """The compared run on 1 device in 1 process."""
  return _train(tmp_path_factory.mktemp("three"), data_flags, *COMPARED)


def test_a_run_killed_mid_way_resumes_to_the_same_losses(tmp_path, data_flags, reference):
  command = _command(tmp_path, data_flags, *REFERENCE)
  process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until step 6 is logged: one checkpoint (step 4) behind it
    if os.path.exists(tmp_path / "metrics.jsonl") and max(_losses(tmp_path), default=0) >= 6:
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(_losses(tmp_path)) < 10, "the run finished before it was killed"
  resumed = _train(tmp_path, data_flags, *REFERENCE)
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=1e-6)


@pytest.mark.parametrize("mesh", [("--config.mesh.data=8",), ("--config.mesh.data=1", "--config.mesh.fsdp=8"),
                                  ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_sharded_training_gives_the_same_losses_as_one_device(tmp_path, data_flags, three_steps, mesh):
  losses = _train(tmp_path, data_flags, *COMPARED, *mesh, devices=8)
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [three_steps[s] for s in (1, 2, 3)], rtol=1e-4)


def test_a_cpu_split_in_two_devices_trains_like_one(tmp_path, data_flags, three_steps):
  """config.cpu_devices=2 in a process XLA_FLAGS gives one device: a data=2 mesh exists only if the split works."""
  losses = _train(tmp_path, data_flags, *COMPARED, "--config.mesh.data=2", cpu_devices=2)
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [three_steps[s] for s in (1, 2, 3)], rtol=1e-4)
  last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
  assert not any(key.startswith("validation/") for key in last)  # train.validation_questions=0: none


def test_a_different_config_refuses_to_resume_and_names_the_keys(tmp_path, data_flags, reference_run):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))
  result = subprocess.run(_command(workdir, data_flags, *REFERENCE, "--config.optim.learning_rate=0.5"),
                          env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  from configs import shapes_tiny
  assert f"optim.learning_rate: {shapes_tiny.get_config().optim.learning_rate} -> 0.5" in result.stderr
  assert "--allow_config_change" in result.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints


@pytest.mark.parametrize("flag,message", [
    ("--config.train.stages=pretrain", "unknown training stage 'pretrain'"),
    ("--config.train.init_from=/nonexistent/run", "train.init_from='/nonexistent/run' does not exist"),
])
def test_bad_stage_or_checkpoint_fails_before_any_work(tmp_path, data_flags, flag, message):
  result = subprocess.run(_command(tmp_path, data_flags, flag), env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and message in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_two_processes_train_like_one(tmp_path, data_flags, three_steps):
  """2 processes on 127.0.0.1 through jax.distributed, one CPU device each, each feeding half of the batch."""
  port = 20000 + os.getpid() % 10000
  processes = [subprocess.Popen(
      _command(tmp_path, data_flags, *COMPARED),
      env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  two = _losses(tmp_path)
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [three_steps[s] for s in (1, 2, 3)], rtol=1e-4)
  assert os.listdir(tmp_path / "checkpoints") == ["3"]  # written once for both processes


def test_the_trained_workdir_serves_generate_and_eval(reference_run, shapes_dir, tmp_path):
  """`vlmjax generate` and `vlmjax eval` read the workdir as `vlmjax.load` does; the run logged its validation."""
  workdir, _ = reference_run
  from PIL import Image

  from vlmjax.data import shapes
  image = tmp_path / "image.png"
  Image.fromarray(shapes.load(shapes_dir, "validation")[0]["image"]).save(image)
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "generate", "--checkpoint", str(workdir), "--image",
                           str(image), "--prompt", "What colour is the circle?", "--max_new_tokens", "4"],
                          env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  out = tmp_path / "results.json"
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "eval", "--workdir", str(workdir), "--out", str(out),
                           "--benchmarks", "shapes_vqa,shapes_pope"], env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads(out.read_text())
  assert 0.0 <= results["shapes_vqa"]["accuracy"] <= 1.0 and "random/f1" in results["shapes_pope"]
  assert (tmp_path / "predictions" / "shapes_vqa.jsonl").exists()
  last = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert last["step"] == 10 and "validation/accuracy" in last and os.path.exists(workdir / "learning_curve.png")


@pytest.mark.parametrize("stage,own_groups", [("contrastive", {"text", "image_projection", "logit_bias"}),
                                              ("classify", {"head", "classifier"})])
def test_a_stage_after_a_vision_pretraining_stage_starts_from_its_vision_tower(tmp_path, data_flags, stage,
                                                                               own_groups):
  """contrastive or classify -> align: align freezes the vision tower, so the VLM's must be the pretraining
  model's, bit for bit."""
  import orbax.checkpoint as ocp

  losses = _train(tmp_path, data_flags, "--config.train.steps=4", f"--config.train.stages={stage}:0.5,align:0.5",
                  f"--config.{stage}.batch_size=8", "--config.train.checkpoint_every=2",
                  "--config.train.keep_checkpoints=3", "--config.train.validation_questions=0")
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
  for key, value in ONE_LAYER.items():
    config.update_from_flattened_dict({key: value})
  vlm_config = VLMConfig.from_dict(config.model)
  initial = nn.meta.unbox(VLM(vlm_config).init(jax.random.key(0), **vlm_config.example_inputs(1)))["params"]
  assert not np.allclose(initial["vision"]["patch_embedding"]["kernel"], vlm["vision"]["patch_embedding"]["kernel"])
