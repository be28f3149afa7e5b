"""Measures this machine's roofline ceilings with JAX: memory bandwidth and matmul throughput (float32 and
bfloat16 operands).

    python tools/roofline.py [--repeats 10]

Bandwidth: a jitted reduction over a 1 GiB float32 array (bytes read / second). Matmul: a jitted 2048^3 matmul
(2·n³ FLOPs / second) of float32 operands, and of bfloat16 operands with float32 accumulation. Medians over
--repeats runs. Other tools import `measure()` to express their figures as fractions of these ceilings, and
`host_description()` to name the machine every benchmark's figures were measured on. On a CPU split into several
devices (`distributed.split_cpu`) one device is a part of the machine: the matmul then runs on every local device
at once, one per device, and the FLOPs are summed.
"""

import argparse
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlmjax import runtime


# Vector extensions that set a CPU's matmul rate (XLA and oneDNN pick kernels by them): an AVX2-only host runs
# float32 matmuls at a third of an AVX-512 host's rate and bfloat16 ones at a tenth.
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def host_description() -> str:
  """One line naming the machine a figure is measured on: the CPU model and its matmul-relevant vector extensions,
  the cores this process may run on (of the machine's), the load average as the benchmark starts (other processes
  on those cores slow PyTorch's spinning threads far more than XLA's: a ratio measured under load is not the
  quiet machine's), and JAX's backend and devices.

  Why: a speed figure or a ratio against a peer holds on the host it was measured on, not on another (DESIGN.md,
  "portable claims"), so every benchmark prints this first. Call it after `distributed.split_cpu`: it starts JAX's
  backends."""
  model, features = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in cpuinfo if ":" in line)}
    model = " ".join(fields.get("model name", model).split())  # the last processor's fields
    flags = set(fields.get("flags", "").split())
    features = [feature for feature in _CPU_FEATURES if feature in flags]
  except OSError:  # not Linux
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  devices = jax.devices()
  return (f"host: {model}" + (f" ({' '.join(features)})" if features else "") +
          f", {cores} cores available to this process (of {os.cpu_count()}), load average {os.getloadavg()[0]:.1f}; "
          f"JAX {jax.__version__} "
          f"{jax.default_backend()} backend, {len(devices)} x {devices[0].device_kind}")


def compute_dtype(model_config) -> str:
  """The dtype a `VLMConfig`'s towers compute in, as a benchmark's table names it: one name, or 'vision / decoder'
  where they differ (the weights are in `param_dtype`, float32 unless a config says otherwise)."""
  vision, decoder = model_config.vision.dtype, model_config.decoder.dtype
  return vision if vision == decoder else f"{vision} / {decoder}"


def median_seconds(fn, *args, repeats: int, warmup: int = 1) -> float:
  """Median wall-clock seconds of `fn(*args)`, blocked until ready, over `repeats` calls after `warmup` calls (the
  first compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable[[], Any]], rounds: int, calls: int, warmup: int = 1,
                               settle_seconds: float = 0.25) -> dict[str, float]:
  """{name: median wall-clock seconds of `fn()`} over `rounds` x `calls` calls: in every round each function is
  called once untimed and then `calls` times timed, in turn; `warmup` calls each up front.

  Why: a shared machine's speed drifts by 10% and more within minutes (on the 2-core development machine the
  bfloat16 matmul peak read 510 to 795 GFLOP/s in five measurements seconds apart), so figures that are divided by
  one another are measured in the same minutes. But each function then runs after the others, and what they leave
  behind slows its first call: PyTorch's threads spin on after its step (a matmul timed straight after one ran at
  673-697 GFLOP/s against 749-762 a 50 ms sleep later), and the first vlmjax train step after a PyTorch step and a
  peak matmul took 258 ms against 90 ms for the next two (medians of 20 rounds). Each function's calls therefore
  start `settle_seconds` after the previous function's, and the first is not timed: the figures are of steady
  running, as in a training loop.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      time.sleep(settle_seconds)
      jax.block_until_ready(fn())
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(seconds) for name, seconds in times.items()}


def peak_matmul(dtype: str = "float32", size: int = 2048) -> tuple[Callable[[], jax.Array], float]:
  """(a call that runs one size^3 matmul of `dtype` operands, float32 accumulation, on every local device at once;
  the FLOPs of a call)."""
  devices = jax.local_devices()
  each = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("device",)), jax.sharding.PartitionSpec("device"))
  shape = (len(devices), size, size)  # one matmul per device
  a = jax.device_put(jax.random.normal(jax.random.key(0), shape, dtype), each)
  b = jax.device_put(jax.random.normal(jax.random.key(1), shape, dtype), each)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  return lambda: matmul(a, b), len(devices) * 2 * size**3


def measure(repeats: int = 10, bandwidth_bytes: int = 1 << 30, matmul_size: int = 2048,
            dtype: str = "float32") -> dict[str, float]:
  """{'bandwidth_gb_s': bytes read per second / 1e9, 'matmul_gflop_s': matmul FLOPs per second / 1e9, with
  operands of `dtype` (float32 accumulation)}."""
  data = jnp.ones((bandwidth_bytes // 4,), jnp.float32)
  seconds = median_seconds(jax.jit(jnp.sum), data, repeats=repeats)
  bandwidth = bandwidth_bytes / seconds / 1e9
  del data
  matmul, flops = peak_matmul(dtype, matmul_size)
  return {"bandwidth_gb_s": bandwidth, "matmul_gflop_s": flops / median_seconds(matmul, repeats=repeats) / 1e9}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  print(host_description())
  ceilings = measure(args.repeats)
  matmul, flops = peak_matmul("bfloat16")
  bfloat16_rate = flops / median_seconds(matmul, repeats=args.repeats) / 1e9
  print(f"{'device':<28}{'memory bandwidth GB/s':>24}{'float32 matmul GFLOP/s':>26}{'bfloat16 matmul GFLOP/s':>26}")
  print(f"{str(jax.devices()[0].device_kind):<28}{ceilings['bandwidth_gb_s']:>24.1f}"
        f"{ceilings['matmul_gflop_s']:>26.1f}{bfloat16_rate:>26.1f}")

if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  main()
