"""`vlmjax train --config.mesh.pipeline=4 --config.mesh.data=2` on 8 fake CPU devices, and its checkpoint resumed on
an fsdp=8 mesh without a pipeline: the parameter tree is the same on every mesh, orbax restores it into the new
shardings, and the steps after it give the losses the pipelined run gave."""

import shutil

import numpy as np
import trainer_runs as runs

# float32 (as test_trainer_sharded.py's runs), scanned layers, 4 decoder layers: one per stage.
RUN = ("--config.train.steps=4", "--config.train.stages=full", "--config.train.checkpoint_every=2",
       "--config.train.validation_questions=0", "--config.model.dtype=float32", "--config.model.scan_layers=True",
       "--config.model.decoder.depth=4")
PIPELINE = ("--config.mesh.pipeline=4", "--config.mesh.data=2", "--config.train.microbatches=4")


def test_a_pipelined_run_resumes_on_another_mesh_with_the_same_losses(tmp_path, data_flags):
  pipelined = runs.train(tmp_path / "pipelined", data_flags, *RUN, *PIPELINE, devices=8)
  assert sorted(pipelined) == [1, 2, 3, 4] and pipelined[4] < pipelined[1]
  # The run as it stood after step 2 (its checkpoint), resumed by fsdp=8 for steps 3 and 4.
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "pipelined", resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  losses = runs.train(resumed, data_flags, *RUN, "--config.mesh.data=1", "--config.mesh.fsdp=8",
                      "--allow_config_change", devices=8)
  np.testing.assert_allclose([losses[3], losses[4]], [pipelined[3], pipelined[4]], rtol=1e-5)
