"""Measures this machine's two roofline ceilings with JAX: memory bandwidth and float32 matmul throughput.

    python tools/roofline.py [--repeats 10]

Bandwidth: a jitted reduction over a 1 GiB float32 array (bytes read / second). Matmul: a jitted 2048^3 float32
matmul (2·n³ FLOPs / second). Medians over --repeats runs. Other tools import `measure()` to express their
figures as fractions of these ceilings. On a CPU split into several devices (`distributed.split_cpu`) one
device is a part of the machine: the matmul then runs on every local device at once, one per device, and the
FLOPs are summed.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from vlmjax import runtime


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


def measure(repeats: int = 10, bandwidth_bytes: int = 1 << 30, matmul_size: int = 2048,
            dtype: str = "float32") -> dict[str, float]:
  """{'bandwidth_gb_s': bytes read per second / 1e9, 'matmul_gflop_s': matmul FLOPs per second / 1e9, with
  operands of `dtype` (float32 accumulation)}."""
  data = jnp.ones((bandwidth_bytes // 4,), jnp.float32)
  seconds = median_seconds(jax.jit(jnp.sum), data, repeats=repeats)
  bandwidth = bandwidth_bytes / seconds / 1e9
  del data
  devices = jax.local_devices()
  each = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("device",)), jax.sharding.PartitionSpec("device"))
  shape = (len(devices), matmul_size, matmul_size)  # one matmul per device
  a = jax.device_put(jax.random.normal(jax.random.key(0), shape, dtype), each)
  b = jax.device_put(jax.random.normal(jax.random.key(1), shape, dtype), each)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  seconds = median_seconds(matmul, a, b, repeats=repeats)
  return {"bandwidth_gb_s": bandwidth, "matmul_gflop_s": len(devices) * 2 * matmul_size**3 / seconds / 1e9}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  ceilings = measure(args.repeats)
  print(f"{'device':<28}{'memory bandwidth GB/s':>24}{'float32 matmul GFLOP/s':>26}")
  print(f"{str(jax.devices()[0].device_kind):<28}{ceilings['bandwidth_gb_s']:>24.1f}"
        f"{ceilings['matmul_gflop_s']:>26.1f}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  main()
