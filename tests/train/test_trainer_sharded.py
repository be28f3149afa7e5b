"""`vlmjax train` on meshes of 8 fake CPU devices, on the CPU split in two and in two processes through
jax.distributed: the same losses as one device in one process."""

import json
import os
import subprocess

import numpy as np
import pytest
import trainer_runs as runs

# The runs compared: 3 steps of the stage that trains every group, one checkpoint at the end, no validation (one
# program to compile per run). They compute in float32: the config's bfloat16 language model sums in another
# order on each mesh and differs by more than the 1e-4 these comparisons hold float32 to.
COMPARED = ("--config.train.steps=3", "--config.train.stages=full", "--config.train.checkpoint_every=3",
            "--config.train.validation_questions=0", "--config.model.dtype=float32")


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, data_flags):
  """The compared run on 1 device in 1 process."""
  return runs.train(tmp_path_factory.mktemp("three"), data_flags, *COMPARED)


@pytest.mark.parametrize("mesh", [("--config.mesh.data=8",), ("--config.mesh.data=1", "--config.mesh.fsdp=8"),
                                  ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_sharded_training_gives_the_same_losses_as_one_device(tmp_path, data_flags, three_steps, mesh):
  losses = runs.train(tmp_path, data_flags, *COMPARED, *mesh, devices=8)
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [three_steps[s] for s in (1, 2, 3)], rtol=1e-4)


def test_a_cpu_split_in_two_devices_trains_like_one(tmp_path, data_flags, three_steps):
  """config.cpu_devices=2 in a process XLA_FLAGS gives one device: a data=2 mesh exists only if the split works."""
  losses = runs.train(tmp_path, data_flags, *COMPARED, "--config.mesh.data=2", cpu_devices=2)
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [three_steps[s] for s in (1, 2, 3)], rtol=1e-4)
  last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
  assert not any(key.startswith("validation/") for key in last)  # train.validation_questions=0: none


def test_two_processes_train_like_one(tmp_path, data_flags, three_steps):
  """2 processes on 127.0.0.1 through jax.distributed, one CPU device each, each feeding half of the batch."""
  port = 20000 + os.getpid() % 10000
  processes = [subprocess.Popen(
      runs.command(tmp_path, data_flags, *COMPARED),
      env=runs.env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  two = runs.losses(tmp_path)
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [three_steps[s] for s in (1, 2, 3)], rtol=1e-4)
  assert os.listdir(tmp_path / "checkpoints") == ["3"]  # written once for both processes
