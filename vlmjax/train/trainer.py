"""`vlmjax train`: one function you read top to bottom — set-up, data, model, stages, the loop.

    vlmjax train --config configs/shapes_tiny.py --workdir /tmp/shapes [--config.train.steps=N ...]

Stages chain in one run (`train.stages = "contrastive:0.2,full:0.8"`: names and fractions of train.steps; see
`stages.py`); each stage starts from the previous one's parameters with a fresh optimizer. Running the same
command on a workdir resumes from its last checkpoint (train state and data-iterator state), step for step;
a damaged one is reported and set aside, and the run goes on from the newest one that restores.

What a run starts from and reads: `train.init_from` a Hugging Face LLaVA / PaliGemma directory (its weights,
tokenizer, chat template and image processor; `configs/from_hf.py`) or another run's workdir, else a random
initialization; `data.sources` the conversations and captions people have (`vlmjax/data/sources.py`), else the
built-in shapes data set. The `lora` stage trains adapters on the frozen base (`adapters.py`).
"""

import dataclasses
import logging
import os
import time
from typing import Callable

import jax
import ml_collections
import tensorflow_datasets as tfds
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import workdir as workdir_lib
from vlmjax.data import pipeline, shapes, sources as sources_lib, variable_images
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.interop import hf, hf_weights
from vlmjax.models import lora
from vlmjax.models.vlm import QWEN_TOWERS, VLM, VLMConfig
from vlmjax.parallel import distributed, mesh as mesh_lib
from vlmjax.train import adapters, optim, pipeline_plan
from vlmjax.train import stages as stages_lib
from vlmjax.train import state as state_lib

# The fields of `Tiles` and `Patches` with a row per example (the rest are tables of the whole batch's images).
PER_ROW_FIELDS = ("token_index", "token_offsets", "token_advance")


def _global_batch(local: dict, mesh) -> dict:
  """This process's rows -> global arrays sharded over the batch axes (each process feeds its own part). A `Tiles`
  or `Patches` keeps its per-row indices so and its tables of the batch's tiles or patches replicated (one process:
  `train` refuses more)."""
  def global_array(value, per_row: bool = True):
    sharding = mesh_lib.batch_sharding(mesh, value.ndim) if per_row else NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_process_local_data(sharding, value)

  def global_value(value):
    if not variable_images.is_image_input(value):
      return global_array(value)
    return value.replace(**{field.name: global_array(getattr(value, field.name), field.name in PER_ROW_FIELDS)
                            for field in dataclasses.fields(value)})
  return {key: global_value(value) for key, value in local.items()}


def train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
          validate: Callable[[dict], dict[str, float]] | None = None) -> None:
  """Trains `config` in `workdir`, resuming the run it holds.

  validate: called with the VLM's parameters every `train.validate_every` steps and at the end of a
  single-process run's last VLM stage; the metrics it returns join that step's row of metrics.jsonl.
  """
  # Everything that can be wrong with the config fails here, before any compile.
  distributed.initialize_from_environment()
  stages = workdir_lib.parse_stages(config.train.stages, config.train.steps)
  if config.train.init_from and not os.path.isdir(config.train.init_from):
    raise FileNotFoundError(f"train.init_from={config.train.init_from!r} does not exist")
  adapters.check(config, stages)
  from_hf = bool(config.train.init_from) and hf.is_hf_checkpoint(config.train.init_from)
  data_sources = sources_lib.parse_sources(config.data.sources) if config.data.get("sources") else []
  if data_sources and not from_hf:
    raise ValueError("data.sources are rendered with a Hugging Face checkpoint's tokenizer and chat template: set "
                     "train.init_from to its directory (configs/from_hf.py:DIR does)")
  # The train step's pipeline (mesh.pipeline > 1); a mesh that cannot run it fails here, naming the numbers.
  model_config = pipeline_plan.pipelined(VLMConfig.from_dict(config.model), config, jax.device_count())
  if model_config.variable_image_tokens:
    _check_variable_images(config, model_config, bool(data_sources))
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.normalize_rules(config.sharding_rules)
  pretraining_stages = sorted({stage.name for stage in stages if stage.pretrains_vision})
  for name in pretraining_stages:
    stages_lib.pretraining_config(config, name)  # a missing or bad section fails before anything runs
  for stage in stages:
    optim.check_optimizer(stages_lib.optim_config(config, stage))
  batch_sizes = {"train.batch_size": config.train.batch_size,
                 **{f"{name}.batch_size": config[name].batch_size for name in pretraining_stages}}
  for key, size in batch_sizes.items():
    if size % jax.process_count():
      raise ValueError(f"{key}={size} must split evenly over {jax.process_count()} processes")
  is_main = jax.process_index() == 0

  # Workdir and data: process 0 writes, the others wait for it. The tokenizer and image processor are the Hugging
  # Face checkpoint's when the run starts from one, else the shapes data set's.
  data_dir = workdir_lib.data_dir(workdir, config)
  tokenizer_dir = config.train.init_from if from_hf else shapes.tokenizer_dir(data_dir)
  if is_main:
    workdir_lib.write_or_check_config(workdir, config, allow_config_change)
    tfds.disable_progress_bar()  # the training bar is the one to watch
    if not (from_hf and data_sources):
      shapes.build(data_dir, config.data.shapes)
    workdir_lib.copy_model_files(tokenizer_dir, workdir)
  multihost_utils.sync_global_devices("vlmjax: workdir and data ready")
  tokenizer_vocab = Tokenizer.from_directory(tokenizer_dir).vocab_size
  if tokenizer_vocab > model_config.decoder.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but model.decoder.vocab_size is "
                     f"{model_config.decoder.vocab_size}")
  source = None if data_sources else shapes.load(data_dir, "train")

  # Models: parameters initialized straight into their shardings (or read from another run).
  def init_params(model_cls, model_cls_config, inputs):
    init = lambda: model_cls(model_cls_config).init(jax.random.key(config.seed), **inputs)
    return mesh_lib.init_sharded(init, mesh, rules)[0]["params"]
  if from_hf:  # straight into the shardings, each device reading its own blocks of the safetensors
    params = hf_weights.load_params(config.train.init_from, model_config, mesh, rules)
  else:
    params = init_params(VLM, model_config, model_config.example_inputs(1))
  pretraining = {name: stages_lib.pretraining_model(config, name, tokenizer_dir) for name in pretraining_stages}

  def init_pretraining(name: str, vision):
    """The parameters of stage `name`'s model around the vision tower `vision`."""
    model = pretraining[name]
    return {**init_params(model.module, model.config, model.init_inputs), "vision": vision}

  def set_up(index: int, stage: workdir_lib.Stage, params) -> tuple:
    """A stage from its start around `params` (a vision pretraining stage takes their tower): (its train state at
    stage.start, update step taking (state, batch), data iterator, bad-record counter, the parameters it keeps
    frozen outside its state: the lora stage's base, else None)."""
    frozen = None
    if stage.pretrains_vision:
      model = pretraining[stage.name]
      stage_config, stage_params = model.config, init_pretraining(stage.name, params["vision"])
      to_example, batch_size, length = model.to_example, model.batch_size, model.length
    else:
      stage_config, stage_params = model_config, params
      if stage.name == workdir_lib.LORA:
        stage_config = adapters.adapted(model_config, adapters.lora_config(config))
        stage_params, frozen = adapters.trained_and_frozen(config, model_config, params, mesh, rules)
      batch_size, length = config.train.batch_size, config.data.length
      to_example = None if data_sources else stages_lib.shapes_example_fn(config, model_config, tokenizer_dir)
    optimizer = optim.make_optimizer(stages_lib.optim_config(config, stage), stage_params, stage.name, stage.steps)
    state, state_shardings = state_lib.create_sharded(stage_params, optimizer, stage.start, mesh)
    step_fn = state_lib.sharded_train_step(state_shardings, config=stage_config, optimizer=optimizer,
                                           stage=stage.name, seed=config.seed)
    train_step = step_fn if frozen is None else lambda state, batch: step_fn(state, batch, frozen)
    bad_records = pipeline.BadRecords()
    common = dict(seed=config.seed + index, batch_size=batch_size // jax.process_count(), length=length,
                  process_index=jax.process_index(), process_count=jax.process_count(), bad_records=bad_records)
    if to_example is None:
      variable = variable_images.VariableImages(model_config) if model_config.variable_image_tokens else None
      inputs = sources_lib.ModelInputs(
          tokenizer=Tokenizer.from_directory(tokenizer_dir), image_processor=ImageProcessor.from_directory(
              tokenizer_dir), image_token_id=model_config.image_token_id,
          tokens_per_image=None if variable else model_config.tokens_per_image, prefix_lm=model_config.prefix_lm,
          max_length=length, variable_images=variable)
      dataset = sources_lib.train_dataset(data_sources, inputs, packing=config.data.get("packing", False),
                                          num_workers=config.data.get("num_workers", 0), **common)
    else:
      dataset = pipeline.train_dataset(source, to_example, source_name=f"{data_dir} (train)", **common)
    return state, train_step, iter(dataset), bad_records, frozen

  def resume_from(step: int, params) -> tuple:
    """What the run goes on with from checkpoint `step`: at a stage's end, (`params` with what that stage trained,
    None), the stages after it starting from them; within a stage, (`params`, the stage's `set_up` with its train
    state and data position read from the checkpoint). A checkpoint that does not restore raises
    workdir.UnreadableCheckpoint."""
    index = next((i for i, stage in enumerate(stages) if step <= stage.end), len(stages) - 1)
    stage = stages[index]
    if step >= stage.end:
      if stage.name == workdir_lib.LORA:  # its checkpoints hold what it trained; the run has nothing after it
        checkpointer.restore_params(step, workdir_lib.abstract_like(set_up(index, stage, params)[0].params))
        return params, None
      if stage.pretrains_vision:
        like = workdir_lib.abstract_like(init_pretraining(stage.name, params["vision"]))
        return {**params, "vision": checkpointer.restore_params(step, like)["vision"]}, None
      return checkpointer.restore_params(step, workdir_lib.abstract_like(params)), None
    state, train_step, iterator, bad_records, frozen = set_up(index, stage, params)
    state, data_state = checkpointer.restore(step, workdir_lib.abstract_like(state))
    iterator.set_state(data_state)
    return params, (state, train_step, iterator, bad_records, frozen)

  checkpointer = workdir_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  if config.train.init_from and not from_hf:
    params = _params_from(config.train.init_from, params)
  # Resume from the newest checkpoint that restores, a finished run's last one included (read, not trained from,
  # so that a damaged one is trained again). A damaged checkpoint is logged and set aside as <step>.corrupt: the
  # run goes on from the one before and saves that step afresh when it gets there.
  resumed = checkpointer.restore_newest(lambda step: resume_from(step, params), set_aside=True)
  latest, (params, resumed_stage) = resumed if resumed is not None else (None, (params, None))
  if latest is not None:
    logging.info("resumed %s at step %d", workdir, latest)
  writer = workdir_lib.MetricsWriter(workdir, enabled=is_main)

  for index, stage in enumerate(stages):
    if latest is not None and latest >= stage.end:
      continue  # finished in an earlier run
    # The first stage left goes on from the checkpoint when it stopped within it; any other starts afresh.
    state, train_step, iterator, bad_records, frozen = resumed_stage or set_up(index, stage, params)
    if frozen is not None:
      # The lora stage trains beside its base as `adapters.stored_base` holds it (the compute dtype, or QLoRA's low
      # bits): the float32 copy that was made from is let go (a 7B's 28 GB), as `vlmjax summarize` counts it.
      _let_go(params, state.params, frozen)
    resumed_stage = None
    optim_config = stages_lib.optim_config(config, stage)
    schedule = optim.learning_rate_schedule(optim_config, stage.steps)
    # Validation generates with the inference code on this process's devices: single-process runs only
    # (a multi-host run's parameters span other hosts; evaluate its workdir with `vlmjax eval`).
    validates = validate is not None and jax.process_count() == 1 and not stage.pretrains_vision

    with mesh_lib.activate(mesh, rules):
      progress = tqdm.tqdm(range(int(state.step), stage.end), initial=int(state.step), total=stage.end,
                           desc=f"{stage.name}", disable=not is_main, dynamic_ncols=True)
      pending, tokens, since = [], 0, time.perf_counter()
      for step in progress:
        local = next(iterator)
        # Tokens for the VLM and the captions of the contrastive stage, images for the classify stage.
        units = local["input_mask"].sum() if "input_mask" in local else len(local["pixel_values"])
        tokens += int(units) * jax.process_count()
        state, metrics = train_step(state, _global_batch(local, mesh))
        pending.append((step + 1, metrics))
        done = step + 1
        validating = validates and (done == stages[-1].end or (
            config.train.validate_every and done % config.train.validate_every == 0))
        if done % config.train.log_every == 0 or done == stage.end or validating:
          fetched = jax.device_get([m for _, m in pending])  # the one host sync per log interval
          elapsed = time.perf_counter() - since
          extra = validate(_model_params(state.params, frozen, config)) if validating else {}
          for i, ((logged_step, _), values) in enumerate(zip(pending, fetched)):
            writer.write(logged_step, stage=stage.name, loss=float(values["loss"]),
                         learning_rate=float(schedule(logged_step - stage.start - 1)),
                         grad_norm=float(values["grad_norm"]), skipped=int(values["skipped"]),
                         step_time=elapsed / len(pending), tokens_per_s=tokens / elapsed,
                         examples_skipped=bad_records.count,
                         **(extra if i == len(pending) - 1 else {}))
          progress.set_postfix(loss=f"{float(fetched[-1]['loss']):.3f}", **{
              k.removeprefix("validation/"): f"{v:.3f}" for k, v in extra.items() if k == "validation/accuracy"})
          pending, tokens, since = [], 0, time.perf_counter()
        if done % config.train.checkpoint_every == 0 or done == stage.end:
          checkpointer.save(done, state, iterator.get_state())
    params = {**params, "vision": state.params["vision"]} if stage.pretrains_vision else state.params

  checkpointer.wait()
  checkpointer.close()
  if is_main:
    writer.plot()
  writer.close()


def _check_variable_images(config: ml_collections.ConfigDict, model_config: VLMConfig, has_sources: bool) -> None:
  """What a LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL run needs, checked before anything compiles: its own data
  (data.sources), one process (each process's batch tables index its own tiles or patches) and no pipeline."""
  family = QWEN_TOWERS.get(model_config.vision_tower, "LLaVA-NeXT")
  if not has_sources:
    raise ValueError(f"a {family} model trains on data.sources (its images at their own size); the built-in shapes "
                     f"data set makes fixed-size images")
  if jax.process_count() > 1:
    raise ValueError(f"training a {family} model runs on one process (its batch's tiles or patches are one table "
                     f"per batch); this run has {jax.process_count()}")
  if config.mesh.get("pipeline", 1) > 1:
    raise ValueError(f"mesh.pipeline={config.mesh.pipeline}: a {family} model trains without a pipeline; set "
                     f"mesh.pipeline=1")


def _let_go(params, *kept) -> None:
  """Deletes the arrays of `params` that none of the trees `kept` holds, so that their memory is free."""
  held = {id(leaf) for tree in kept for leaf in jax.tree.leaves(tree)}
  for leaf in jax.tree.leaves(params):
    if id(leaf) not in held:
      leaf.delete()


def _model_params(trained, frozen, config: ml_collections.ConfigDict):
  """The whole model's parameters of a stage's state: a lora stage's adapters merged into its base."""
  if frozen is None:
    return trained
  return lora.merge(lora.combine(frozen, trained), adapters.lora_config(config))


def _params_from(workdir: str, like):
  """The latest parameters of another run's workdir (that restore), in the shardings of `like`."""
  checkpointer = workdir_lib.Checkpointer(workdir, asynchronous=False)
  try:
    found = checkpointer.restore_latest_params(workdir_lib.abstract_like(like))  # a damaged newest one skipped
  finally:
    checkpointer.close()
  if found is None:
    raise FileNotFoundError(f"train.init_from={workdir!r} holds no finished checkpoint")
  return found[1]
