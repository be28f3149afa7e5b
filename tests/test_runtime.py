"""`runtime.exec_with_huge_pages`: the re-exec, the opt-out, and the page faults it saves; `runtime.aligned_zeros`,
which the CPU device reads in place."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlmjax import runtime

# Prints its PID, re-executes with huge pages, then prints the tunables and, after three runs of a program whose
# temporaries take 64 MB, the minor page faults of the last run.
SCRIPT = """
import os, resource
print(os.getpid(), flush=True)
from vlmjax import runtime
runtime.exec_with_huge_pages()
import jax, jax.numpy as jnp
step = jax.jit(lambda x, w: jnp.sum((x @ x.T) @ w))  # x @ x.T: a [4096, 4096] float32 temporary
x, w = jnp.ones((4096, 8)), jnp.ones((4096, 4))
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w).block_until_ready()
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# Only the restart: its PID before and after, and the tunables it ends with.
RESTART_ONLY = """
import os
print(os.getpid(), flush=True)
from vlmjax import runtime
runtime.exec_with_huge_pages()
print(os.environ.get("GLIBC_TUNABLES"))
"""


def _run(tunables: str | None, script: str = SCRIPT, **settings: str) -> list[str]:
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  env.update(settings)
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stdout.split()


@pytest.mark.skipif(not runtime.huge_pages_on_request(),
                    reason="needs Linux, glibc 2.35+ and huge pages in madvise mode")
def test_the_process_restarts_itself_with_huge_pages_and_faults_far_less():
  *pids, tunables, huge_faults = _run(None)
  assert len(pids) == 2 and pids[0] == pids[1]  # started twice, in one process
  assert tunables == "glibc.malloc.hugetlb=1"
  *pids, tunables, small_faults = _run("glibc.malloc.hugetlb=0")  # the opt-out: no re-exec
  assert len(pids) == 1 and tunables == "glibc.malloc.hugetlb=0"
  assert int(small_faults) > 10_000 > 10 * int(huge_faults)


def test_other_tunables_are_kept():
  *pids, tunables, _ = _run("glibc.malloc.arena_max=2")
  if runtime.huge_pages_on_request():
    assert len(pids) == 2 and tunables == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  else:
    assert len(pids) == 1 and tunables == "glibc.malloc.arena_max=2"


@pytest.mark.skipif(not runtime.huge_pages_on_request(),
                    reason="needs Linux, glibc 2.35+ and huge pages in madvise mode")
@pytest.mark.parametrize("settings", [{runtime.SWITCH: "0"}, {"JAX_PLATFORMS": "cuda,cpu"}],
                         ids=["switched-off", "gpu-backend"])
def test_no_restart_where_the_switch_is_off_or_the_backend_is_not_the_cpu(settings):
  """The re-exec is host-specific tuning: only for XLA's CPU backend (here named by JAX_PLATFORMS, which JAX
  reads first), and off with the switch."""
  assert _run(None, RESTART_ONLY, **settings)[1:] == ["None"]  # one PID: no restart
  assert _run(None, RESTART_ONLY, JAX_PLATFORMS="cpu")[2:] == [f"{runtime.HUGE_PAGES}=1"]  # two PIDs


@pytest.mark.parametrize("shape,dtype", [((3, 5), np.float32), ((7,), np.int32), ((2, 64, 64, 3), np.float32)])
def test_aligned_zeros_are_read_in_place_by_the_cpu_device(shape, dtype):
  """What the alignment buys: `jax.device_put` hands the numpy buffer itself to the CPU device (numpy's own 16-byte
  alignment makes it copy)."""
  array = runtime.aligned_zeros(shape, dtype)
  assert array.shape == shape and array.dtype == dtype and not array.any() and array.flags.c_contiguous
  on_device = jax.device_put(array)
  assert on_device.unsafe_buffer_pointer() == array.ctypes.data
