"""The pipeline (`vlmjax.parallel.pipeline`) on 8 fake CPU devices: the loss and gradients of one device under
pipeline x data and pipeline x fsdp x tensor meshes, the shardings of its stages' weights, and the errors of a plan
the mesh cannot run, raised before anything compiles."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import shapes_tiny, sizes
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib, pipeline
from vlmjax.train import gradients, pipeline_plan, state as state_lib, trainer

CONFIG = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=64, width=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=63, vision_feature_layer=None, vision_feature_select="full"))
BATCH_SIZE = 16


def _batch():
  inputs = CONFIG.example_inputs(BATCH_SIZE, text_length=6, seed=0)
  ids = np.asarray(inputs["input_ids"])
  loss_mask = (np.random.default_rng(0).uniform(size=ids.shape) < 0.5).astype(np.float32)
  return dict(inputs, targets=np.roll(ids, -1, axis=1), loss_mask=loss_mask)


def _loss_and_grads(config: VLMConfig, params, batch):
  """The finetune stage's: the vision tower frozen, gradients for the projector and the decoder."""
  trained = {group: params[group] for group in ("projector", "decoder")}
  return gradients.loss_and_grads(lambda p, b: state_lib.vlm_loss(p, config, b), trained,
                                  {"vision": params["vision"]}, batch, decomposable=True)


def _init():
  return VLM(CONFIG).init(jax.random.key(0), **CONFIG.example_inputs(1))


@pytest.fixture(scope="module")
def one_device():
  """(params, (loss, count, grads)) on one device, without a pipeline."""
  params = jax.jit(lambda: nn.meta.unbox(_init())["params"])()
  return params, jax.jit(lambda p, b: _loss_and_grads(CONFIG, p, b))(params, _batch())


@pytest.mark.parametrize("microbatches", [4, 8])
@pytest.mark.parametrize("mesh_config", [dict(pipeline=4, data=2), dict(pipeline=2, fsdp=2, tensor=2)],
                         ids=["pipeline4-data2", "pipeline2-fsdp2-tensor2"])
def test_the_pipeline_gives_the_loss_and_gradients_of_one_device(one_device, mesh_config, microbatches):
  """float32; each gradient within 1e-5 of its largest entry (sums over rows run in another order per mesh)."""
  _, (loss, count, grads) = one_device
  mesh = mesh_lib.make_mesh(mesh_config)
  params = mesh_lib.init_sharded(_init, mesh, mesh_lib.LOGICAL_RULES)[0]["params"]
  up = params["decoder"]["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]: a stage's layers per device
  assert mesh_lib.shard_count(up)[0] == mesh_config["pipeline"]
  config = CONFIG.replace(decoder=CONFIG.decoder.replace(pipeline_stages=mesh_config["pipeline"],
                                                         pipeline_microbatches=microbatches))
  with mesh_lib.activate(mesh, mesh_lib.LOGICAL_RULES):
    step = jax.jit(lambda p, b: _loss_and_grads(config, p, b))
    compiled = step.lower(params, jax.device_put(_batch(), mesh_lib.batch_sharding(mesh))).compile()
    result = compiled(params, jax.device_put(_batch(), mesh_lib.batch_sharding(mesh)))
  assert "collective-permute" in compiled.as_text()  # stage to stage, between neighbours
  np.testing.assert_allclose(result[0], loss, rtol=1e-5)
  assert float(result[1]) == float(count)
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(grads)]
  for path, got, want in zip(paths, jax.tree.leaves(result[2]), jax.tree.leaves(grads), strict=True):
    error = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert error < 1e-5, (path, error)


def test_the_bubble_and_the_microbatches():
  assert pipeline.bubble_fraction(4, 1) == 3 / 4 and pipeline.bubble_fraction(4, 12) == 3 / 15
  rows = np.arange(12)
  split = pipeline.split_microbatches(rows, 4)  # microbatch m: rows m, 4 + m, 8 + m
  np.testing.assert_array_equal(split[1], [1, 5, 9])
  np.testing.assert_array_equal(pipeline.merge_microbatches(split), rows)


def _config(**overrides):
  config = shapes_tiny.get_config()
  config.model.scan_layers = True
  config.train.batch_size = 16
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.pipeline": 3, "mesh.data": 1}, r"mesh: pipeline=3 x data=1 x fsdp=1 x tensor=1 uses 3 devices but "
     r"there are 8"),
    ({"mesh.pipeline": 8, "mesh.data": 1}, r"model.decoder.depth=4 layers do not split into mesh.pipeline=8 stages "
     r"\(4 is not a multiple of 8\)"),
    ({"mesh.pipeline": 4, "mesh.data": 2, "train.microbatches": 3}, r"train.batch_size=16 does not split into "
     r"train.microbatches=3 microbatches \(16 is not a multiple of 3\)"),
    ({"mesh.pipeline": 2, "mesh.data": 4, "train.microbatches": 8}, r"a microbatch of 2 rows \(train.batch_size=16 / "
     r"train.microbatches=8\) does not split over the 4 batch ways \(mesh.data=4 x mesh.fsdp=1\): make "
     r"train.batch_size a multiple of 32"),
    ({"mesh.pipeline": 1, "mesh.data": 1, "mesh.tensor": 8}, r"model.decoder.num_heads=4 does not split over "
     r"mesh.tensor=8 \(4 is not a multiple of 8\)"),
    ({"mesh.pipeline": 2, "mesh.data": 4, "model.scan_layers": False}, r"mesh.pipeline=2 splits the decoder's "
     r"stacked layers into stages: set model.scan_layers=True"),
    ({"train.microbatches": 4}, r"train.microbatches=4 splits the batch for a pipeline, and mesh.pipeline=1 has none"),
], ids=["devices", "layers", "batch", "rows", "heads", "unscanned", "no-pipeline"])
def test_a_plan_the_mesh_cannot_run_fails_before_anything_runs(tmp_path, overrides, message):
  """`vlmjax train` raises before it writes its workdir (so before any compile); `vlmjax summarize` the same."""
  config = _config(**overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    trainer.train(config, str(workdir))
  assert not os.path.exists(workdir)
  with pytest.raises(ValueError, match=message):
    pipeline_plan.report(config, num_devices=8)


def test_summarize_prints_the_plan():
  config = _config(**{"mesh.pipeline": 4, "mesh.data": 2, "train.microbatches": 8})
  lines = pipeline_plan.report(config, num_devices=8).splitlines()
  assert lines[0].startswith("pipeline: 4 stages of 1 decoder layer(s) each (model.decoder.depth=4), 8 microbatches "
                             "of 2 rows (train.batch_size=16), 11 iterations"), lines[0]
  assert lines[1].startswith("bubble: (P - 1) / (M + P - 1) = 3/11 = 27.3%"), lines[1]
  assert lines[2].startswith("bytes per device: parameters "), lines[2]
  assert "11 x [1, 224, 128] bfloat16" in lines[2]  # 2 rows of a microbatch over data=2
  assert pipeline_plan.report(_config(), num_devices=8) == ""
