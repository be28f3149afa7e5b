"""Host-specific tuning and its one switch, and the process settings that must be in place before the interpreter
starts (the `vlmjax` command and the benchmarks in tools/ re-execute themselves with them).

The switch: `VLMJAX_CPU_TUNING`. Unset or 1, what was written for XLA's CPU backend applies where JAX's backend is
the CPU, and only there: the numerics chosen by `cpu_tuned()` (the matmul and attention backward passes, the
float32 activation loop, the blocked causal attention, the polynomial sine and cosine) and the huge-page re-exec
below. 0: the standard JAX path everywhere (`jax.nn.dot_product_attention`, `jnp.sin`, JAX's own gradients) and
no re-exec. On a GPU or TPU the standard path is the only one, its training and prefill attention through the
backend's fused kernel (`models/fused_attention.py`). docs/host_specific.md lists each piece and why.

Huge pages for XLA's CPU buffers. Each execution of a compiled program allocates its temporaries in one block
(130 MB per device for the shapes_tiny training step); glibc's malloc maps a block that large afresh and unmaps it
when freed, so every step faults every page of it in again, 4 KiB at a time: 63,000 page faults and 0.1 s of
kernel time per step on the 2-core development machine. With the glibc tunable `glibc.malloc.hugetlb=1` malloc
asks for transparent huge pages on such mappings (in `madvise` mode, this host's, Linux gives them only when asked) and
a step faults in 2 MiB at a time: 1,000 page faults, and the step took 0.122 s instead of 0.173 s
(tools/bench_train.py at the bench shape). glibc reads its tunables only when a process starts, hence the re-exec.
"""

import contextlib
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import Iterator

import numpy as np

SWITCH = "VLMJAX_CPU_TUNING"
HUGE_PAGES = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# The packages through which JAX finds a GPU or TPU; with none installed its backend is the CPU.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
_forced: bool | None = None  # set by `cpu_tuning`


def _switch_on() -> bool:
  return os.environ.get(SWITCH, "1").strip() != "0"


def cpu_tuned() -> bool:
  """Whether the numerics written for XLA's CPU backend apply: JAX's default backend is the CPU and the switch is
  not 0 (or `cpu_tuning` says otherwise). Read when a model is traced: a compiled program keeps its path."""
  if _forced is not None:
    return _forced
  import jax

  return _switch_on() and jax.default_backend() == "cpu"


@contextlib.contextmanager
def cpu_tuning(enabled: bool) -> Iterator[None]:
  """Within the block, the models trace the CPU-tuned path (True) or the standard JAX path (False) whatever the
  backend: for the tests that hold the two against each other, and for A/B benchmarks."""
  global _forced
  previous, _forced = _forced, enabled
  try:
    yield
  finally:
    _forced = previous


def _backend_is_cpu() -> bool:
  """Whether JAX's backend will be the CPU, asked of JAX (which starts its backends) only where a GPU or TPU
  plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if not _accelerator_plugin_installed():
    return True
  import jax

  return jax.default_backend() == "cpu"


def _accelerator_plugin_installed() -> bool:
  """A package through which JAX finds a GPU or TPU: one of _ACCELERATOR_PLUGINS, or a module in the
  `jax_plugins` namespace (where newer plugins register)."""
  if any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
    return True
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  import jax_plugins

  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def huge_pages_on_request() -> bool:
  """Whether malloc must ask for huge pages to get them, and can: Linux with glibc 2.35 or later (the tunable's
  first release) and transparent huge pages in `madvise` mode (in `always` mode large mappings get them anyway, in
  `never` mode not at all)."""
  libc, version = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
    return False
  try:
    with open(_THP_MODE) as mode:
      return "[madvise]" in mode.read()
  except OSError:
    return False


def exec_with_huge_pages() -> None:
  """Re-executes this process (same PID, same command line) with `GLIBC_TUNABLES` asking malloc for huge pages.

  Returns without re-executing where that would change nothing (`huge_pages_on_request` is False), where JAX's
  backend is not the CPU (XLA's GPU and TPU buffers live on the device), where the switch (`VLMJAX_CPU_TUNING=0`)
  is off, or where GLIBC_TUNABLES already sets the tunable, e.g. `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to keep
  4 KiB pages. Call it first thing in a program's entry point: what the process did before is lost.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if HUGE_PAGES in tunables or not _switch_on() or not huge_pages_on_request() or not _backend_is_cpu():
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{HUGE_PAGES}=1"]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


# XLA's CPU client reads a numpy array in place, without a copy, when its data starts at a 64-byte boundary (as
# `jax.device_put` or an argument of a jitted function); numpy's allocations start at 16. A 1280 x 1280 image's
# patches for Qwen2.5-VL (43 MB) took 24 ms to copy on the 2-core AMD EPYC and 0.04 ms to hand over in place. A
# GPU or TPU copies them to the device either way.
HOST_ALIGNMENT = 64


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
  """numpy zeros whose data starts at a HOST_ALIGNMENT-byte boundary, for a large model input that a CPU device then
  reads in place: once handed to JAX, the array must not be written (the device array would see the change)."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  buffer = np.zeros(size + HOST_ALIGNMENT, np.uint8)
  start = -buffer.ctypes.data % HOST_ALIGNMENT
  return buffer[start:start + size].view(dtype).reshape(shape)


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`: every program this process compiles is written there, and
  a later process with the same program, JAX and device reads it instead of compiling (a restarted server's
  start-up). Programs of every size and compile time are kept: a server's are small."""
  import jax

  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
