"""`vlmjax train`: one function you read top to bottom — set-up, data, model, stages, the loop.

    vlmjax train --config configs/shapes_tiny.py --workdir /tmp/shapes [--config.train.steps=N ...]

Stages chain in one run (`train.stages = "align:0.2,finetune:0.8"`: names and fractions of train.steps); each
stage starts from the previous one's parameters with a fresh optimizer. Running the same command on a workdir
resumes from its last checkpoint (train state and data-iterator state), step for step.
"""

import dataclasses
import logging
import os
import time

import jax
import ml_collections
import tensorflow_datasets as tfds
import tqdm
from jax.experimental import multihost_utils

from vlmjax.data import pipeline, shapes, shapes_tasks
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import distributed, mesh as mesh_lib
from vlmjax.train import checkpoint as checkpoint_lib
from vlmjax.train import metrics_writer, optim
from vlmjax.train import state as state_lib
from vlmjax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  start: int  # global step at which the stage begins
  end: int  # global step after its last update

  @property
  def steps(self) -> int:
    return self.end - self.start


def parse_stages(spec: str, total_steps: int) -> list[Stage]:
  """'align:0.2,finetune:0.8' (fractions of total_steps; a lone name takes all) -> Stages, checked."""
  stages, start = [], 0
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items:
    raise ValueError("train.stages is empty: name at least one stage, e.g. 'full'")
  for i, item in enumerate(items):
    name, _, fraction = item.partition(":")
    optim.check_stage(name)
    end = total_steps if i == len(items) - 1 else start + round(float(fraction or 1.0) * total_steps)
    if end <= start:
      raise ValueError(f"train.stages: stage {name!r} gets no steps ({item!r} of train.steps={total_steps})")
    stages.append(Stage(name, start, end))
    start = end
  return stages


def shapes_example_fn(config: ml_collections.ConfigDict, model_config: VLMConfig, model_dir: str):
  """(shapes record, rng) -> training arrays, with the tokenizer and image processor saved in model_dir."""
  encoder = pipeline.ConversationEncoder(tokenizer=Tokenizer.from_directory(model_dir),
                                         image_token_id=model_config.image_token_id,
                                         tokens_per_image=model_config.tokens_per_image,
                                         max_length=config.data.length)
  image_processor = ImageProcessor.from_directory(model_dir)

  def to_example(record, rng):
    ids, assistant = encoder(shapes_tasks.training_messages(record, rng))
    return pipeline.example_arrays(ids, assistant, image_processor([record["image"]])[0])
  return to_example


def _global_batch(local: dict, mesh) -> dict:
  """This process's rows -> global arrays sharded over the batch axes (each process feeds its own part)."""
  return {key: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, value.ndim), value)
          for key, value in local.items()}


def train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> None:
  # Everything that can be wrong with the config fails here, before any compile.
  distributed.initialize_from_environment()
  stages = parse_stages(config.train.stages, config.train.steps)
  if config.train.init_from and not os.path.isdir(config.train.init_from):
    raise FileNotFoundError(f"train.init_from={config.train.init_from!r} does not exist")
  model_config = VLMConfig.from_dict(config.model)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.normalize_rules(config.sharding_rules)
  if config.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={config.train.batch_size} must split evenly over {jax.process_count()} "
                     f"processes")
  is_main = jax.process_index() == 0

  # Workdir and data: process 0 writes, the others wait for it.
  data_dir = config.data.dir or os.path.join(workdir, "data")
  if is_main:
    workdir_lib.write_or_check_config(workdir, config, allow_config_change)
    tfds.disable_progress_bar()  # the training bar is the one to watch
    shapes.build(data_dir, config.data.shapes)
    workdir_lib.copy_model_files(shapes.tokenizer_dir(data_dir), workdir)
  multihost_utils.sync_global_devices("vlmjax: workdir and data ready")
  tokenizer_vocab = Tokenizer.from_directory(shapes.tokenizer_dir(data_dir)).vocab_size
  if tokenizer_vocab > model_config.decoder.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but model.decoder.vocab_size is "
                     f"{model_config.decoder.vocab_size}")
  source = shapes.load(data_dir, "train")
  to_example = shapes_example_fn(config, model_config, shapes.tokenizer_dir(data_dir))

  # Model: parameters initialized straight into their shardings (or read from another run).
  model = VLM(model_config)
  init = lambda: model.init(jax.random.key(config.seed), **model_config.example_inputs(1))
  params = mesh_lib.init_sharded(init, mesh, rules)[0]["params"]
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  if config.train.init_from:
    params = _params_from(config.train.init_from, params)
  latest = checkpointer.latest_step()
  writer = metrics_writer.MetricsWriter(workdir, enabled=is_main)

  for index, stage in enumerate(stages):
    if latest is not None and latest >= stage.end:
      continue  # finished in an earlier run
    if latest is not None and latest == stage.start:
      params = checkpointer.restore_params(latest, checkpoint_lib.abstract_like(params))
    optimizer = optim.make_optimizer(config.optim, params, stage.name, stage.steps)
    state = jax.jit(lambda p: state_lib.create(p, optimizer, stage.start))(params)
    bad_records = pipeline.BadRecords()
    dataset = pipeline.train_dataset(
        source, to_example, seed=config.seed + index, batch_size=config.train.batch_size // jax.process_count(),
        length=config.data.length, process_index=jax.process_index(), process_count=jax.process_count(),
        source_name=f"{data_dir} (train)", bad_records=bad_records)
    iterator = iter(dataset)
    if latest is not None and stage.start < latest < stage.end:
      state, data_state = checkpointer.restore(latest, checkpoint_lib.abstract_like(state))
      iterator.set_state(data_state)
      logging.info("resumed %s at step %d", workdir, latest)
    schedule = optim.learning_rate_schedule(config.optim, stage.steps)

    with mesh_lib.activate(mesh, rules):
      progress = tqdm.tqdm(range(int(state.step), stage.end), initial=int(state.step), total=stage.end,
                           desc=f"{stage.name}", disable=not is_main, dynamic_ncols=True)
      pending, tokens, since = [], 0, time.perf_counter()
      for step in progress:
        local = next(iterator)
        tokens += int(local["input_mask"].sum()) * jax.process_count()
        state, metrics = state_lib.train_step(state, _global_batch(local, mesh), config=model_config,
                                              optimizer=optimizer, stage=stage.name)
        pending.append((step + 1, metrics))
        done = step + 1
        # Validation generates with the inference code on this process's devices: single-process runs only
        # (a multi-host run's parameters span other hosts; evaluate its workdir with `vlmjax eval`).
        validate = jax.process_count() == 1 and (done == stages[-1].end or (
            config.train.validate_every and done % config.train.validate_every == 0))
        if done % config.train.log_every == 0 or done == stage.end or validate:
          fetched = jax.device_get([m for _, m in pending])  # the one host sync per log interval
          elapsed = time.perf_counter() - since
          extra = _validate(config, state.params, model_dir=workdir, data_dir=data_dir) if validate else {}
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
    params = state.params

  checkpointer.wait()
  checkpointer.close()
  if is_main:
    writer.plot()
  writer.close()


def _validate(config: ml_collections.ConfigDict, params, model_dir: str, data_dir: str) -> dict[str, float]:
  """Exact-match VQA accuracy (overall and per question type) on the first validation questions, answered by
  the inference code (batched greedy generation) with the current parameters."""
  from vlmjax.eval import benchmarks

  vlm = workdir_lib.facade(config, params, model_dir)
  benchmark = benchmarks.get("shapes_vqa")
  samples = benchmark.samples(data_dir)[:config.train.validation_questions]
  answers = []
  for start in range(0, len(samples), 64):
    batch = samples[start:start + 64]
    answers += vlm.generate([s.images[0] for s in batch], [s.prompt for s in batch],
                            max_new_tokens=benchmark.max_new_tokens)
  exact = {}
  for sample, answer in zip(samples, answers):
    correct = float(answer.strip() == sample.target[0])
    exact.setdefault("validation/accuracy", []).append(correct)
    exact.setdefault(f"validation/accuracy/{sample.group}", []).append(correct)
  return {key: sum(values) / len(values) for key, values in exact.items()}


def _params_from(workdir: str, like):
  """The latest parameters of another run's workdir, in the shardings of `like`."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, asynchronous=False)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"train.init_from={workdir!r} holds no finished checkpoint")
  params = checkpointer.restore_params(step, checkpoint_lib.abstract_like(like))
  checkpointer.close()
  return params
