"""Multi-host start-up: `jax.distributed.initialize` from the usual environment variables.

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
