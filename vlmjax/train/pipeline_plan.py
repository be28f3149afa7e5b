"""A run's pipeline (mesh.pipeline stages over train.microbatches, `vlmjax/parallel/pipeline.py`): checked and set in
the model config the train step runs (`pipelined`), and the plan `vlmjax summarize` prints under the memory table
(`report`): the decoder's layers per stage, the microbatches and the bubble, the bytes per device, computed without
allocating anything.

    model_config = pipeline_plan.pipelined(VLMConfig.from_dict(config.model), config, jax.device_count())
    print(pipeline_plan.report(config, num_devices=8))
"""

import math

import flax.linen as nn
import ml_collections

from vlmjax.models import summary
from vlmjax.models.config import dtype
from vlmjax.models.vlm import VLMConfig
from vlmjax.parallel import mesh as mesh_lib, pipeline
from vlmjax.train import memory


def pipelined(model_config: VLMConfig, config: ml_collections.ConfigDict, num_devices: int) -> VLMConfig:
  """`model_config` with the train step's pipeline (mesh.pipeline stages, train.microbatches), after checking that
  the mesh of `num_devices` devices can run it (`pipeline.check`: heads, layers, microbatches)."""
  sizes = mesh_lib.mesh_shape(config.mesh, num_devices)
  decoder, microbatches = model_config.decoder, config.train.get("microbatches", 1)
  pipeline.check(depth=decoder.depth, num_heads=decoder.num_heads, num_kv_heads=decoder.num_kv_heads,
                 scan_layers=decoder.scan_layers, mesh_sizes=sizes, batch_size=config.train.batch_size,
                 microbatches=microbatches)
  return model_config.replace(decoder=decoder.replace(pipeline_stages=sizes[pipeline.MESH_AXIS],
                                                      pipeline_microbatches=microbatches))


def report(config: ml_collections.ConfigDict, num_devices: int) -> str:
  """Plain-text lines of the plan, or "" when the config runs no pipeline (mesh.pipeline = 1). A plan the mesh cannot
  run raises `pipeline.check`'s ValueError, as `vlmjax train` would.

  Bytes per device: the parameters at their shard shapes (the decoder's layers split over the stages), and the
  pipeline's activation buffers: the stage inputs each iteration keeps for the backward pass (M + P - 1 of
  [b, T, D], each stage's own microbatch rows per device) and the microbatched input and output of the stack
  (2 x [M, b, T, D], whole on every stage). What a stage computes within one microbatch is counted in the memory
  table's activations, which do not know the pipeline: they count every layer at once over train.batch_size.
  """
  model_config = pipelined(VLMConfig.from_dict(config.model), config, num_devices)
  decoder = model_config.decoder
  stages, microbatches = decoder.pipeline_stages, decoder.pipeline_microbatches
  if stages == 1:
    return ""
  mesh = mesh_lib.abstract_mesh(config.mesh, num_devices)
  params = summary.abstract_params(model_config)
  shardings = mesh_lib.param_shardings(params, mesh, config.sharding_rules)
  unboxed = nn.meta.unbox(params)
  layer_bytes = memory.sharded_bytes(unboxed["decoder"]["layers"], shardings["decoder"]["layers"])
  all_bytes = memory.sharded_bytes(unboxed, shardings)
  rows = config.train.batch_size // microbatches // math.prod(mesh.shape[axis] for axis in mesh_lib.BATCH_AXES)
  length = memory.sequence_length(config, model_config)
  microbatch = rows * length * decoder.width * dtype(decoder.dtype).itemsize  # one microbatch's [b, T, D] here
  iterations = microbatches + stages - 1
  shape = f"[{rows}, {length}, {decoder.width}] {decoder.dtype}"
  return "\n".join([
      f"pipeline: {stages} stages of {decoder.depth // stages} decoder layer(s) each (model.decoder.depth="
      f"{decoder.depth}), "
      f"{microbatches} microbatches of {config.train.batch_size // microbatches} rows (train.batch_size="
      f"{config.train.batch_size}), {iterations} iterations",
      f"bubble: (P - 1) / (M + P - 1) = {stages - 1}/{iterations} = "
      f"{pipeline.bubble_fraction(stages, microbatches):.1%} of each stage's time idle",
      f"bytes per device: parameters {memory.human(all_bytes)} (decoder layers {memory.human(layer_bytes)}: one "
      f"stage's {decoder.depth // stages}; the rest {memory.human(all_bytes - layer_bytes)}), pipeline buffers "
      f"{memory.human((iterations + 2 * microbatches) * microbatch)} (stage inputs kept for the backward: "
      f"{iterations} x {shape}; the stack's input and output: 2 x {microbatches} x {shape})",
  ])
