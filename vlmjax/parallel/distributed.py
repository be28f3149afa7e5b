"""Process start-up: `jax.distributed.initialize` from the usual environment variables, and the CPU's devices.

    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 vlmjax train ...

The same command line runs on every host; only JAX_PROCESS_ID differs. Without these variables the run is a
single process. On CPU the collectives go through gloo.

What the processes of a run that is not one program over all devices (`vlmjax eval`: each process its own
questions) exchange: `gather_texts` (every process's answers, on every process) and `broadcast_flags` (process 0's
view of which questions are still unanswered) and `differing_processes` (whether they read the same model and
questions).
"""

import hashlib
import os

import jax
import numpy as np


def initialize_from_environment() -> None:
  """Joins the job described by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, if set."""
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name not in os.environ]
  if missing:
    raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not: set all three for a multi-host run")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; accelerators have their own
  jax.distributed.initialize(coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                             process_id=int(os.environ["JAX_PROCESS_ID"]))


def split_cpu(count: int) -> None:
  """Makes this process's CPU `count` XLA devices (`jax_num_cpu_devices`); 0 keeps JAX's default (one, or what
  XLA_FLAGS' --xla_force_host_platform_device_count says). Only a process's entry point can call it: JAX reads
  it when it starts its backends, before any array exists.

  Why: one CPU device runs each op of its program across all cores, and a small model's ops are too small to
  divide well. One device per core, the batch split over them along the mesh's data axis, keeps each core on
  its own part: on the 2-core development machine the shapes_tiny finetune step took 0.226 s on 2 devices
  against 0.275 s on one (medians of 3 runs side by side; 0.240-0.256 s on 4 devices). Since its matmuls run in
  bfloat16 the gain is small: 0.190 s against 0.196 s, and the classify step, a float32 tower, is
  faster on one device (0.270 s against 0.291 s; 260-step runs, each order once). Since the step's temporaries
  fault in huge pages (`vlmjax.runtime`) one device wins the finetune step too (0.150 s against
  0.162 s) and shapes_tiny uses one; the bench shape's full step (tools/bench_train.py, vision tower trained too)
  still takes 0.122 s on two against 0.136 s on one (experiments/shapes_tiny/README.md, 2026-12-05 huge-pages).
  """
  if count < 0:
    raise ValueError(f"cpu_devices must be 0 (JAX's default) or a device count, got {count}")
  if count:
    jax.config.update("jax_num_cpu_devices", count)


def gather_texts(texts: list[str]) -> list[str]:
  """Every process's `texts`, joined in process order, on every process; a process may give none. Three
  collectives: the counts (int32[P]), the byte lengths (int32[P, N], N the most texts any process gave) and the
  UTF-8 bytes padded to the longest (uint8[P, N, L])."""
  if jax.process_count() == 1:
    return list(texts)
  from jax.experimental import multihost_utils

  encoded = [text.encode() for text in texts]
  counts = multihost_utils.process_allgather(np.asarray(len(encoded), np.int32))  # int32[P]
  rows = int(counts.max())
  lengths = np.full((rows,), -1, np.int32)  # -1: no text in this row
  lengths[:len(encoded)] = [len(data) for data in encoded]
  every_length = multihost_utils.process_allgather(lengths)  # int32[P, N]
  padded = np.zeros((rows, max(int(every_length.max()), 1)), np.uint8)
  for row, data in enumerate(encoded):
    padded[row, :len(data)] = np.frombuffer(data, np.uint8)
  every_text = multihost_utils.process_allgather(padded)  # uint8[P, N, L]
  return [every_text[process, row, :length].tobytes().decode()
          for process in range(every_length.shape[0]) for row, length in enumerate(every_length[process])
          if length >= 0]


def broadcast_flags(flags: np.ndarray) -> np.ndarray:
  """Process 0's `flags` (bool[N], N the same on every process) on every process."""
  if jax.process_count() == 1:
    return flags
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.broadcast_one_to_all(flags.astype(np.uint8))).astype(bool)


def differing_processes(text: str) -> list[int]:
  """The processes whose `text` differs from process 0's (a digest of it is compared), on every process."""
  if jax.process_count() == 1:
    return []
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  every_digest = multihost_utils.process_allgather(digest)  # uint8[P, 32]
  return [process for process in range(1, every_digest.shape[0])
          if not np.array_equal(every_digest[process], every_digest[0])]
