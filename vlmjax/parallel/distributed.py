"""Process start-up: `jax.distributed.initialize` from the usual environment variables, and the CPU's devices.

    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 vlmjax train ...

The same command line runs on every host; only JAX_PROCESS_ID differs. Without these variables the run is a
single process. On CPU the collectives go through gloo.
"""

import os

import jax


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
