"""`trig.sincos` against float64 NumPy, over RoPE's angles and over random ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import trig

_sincos = jax.jit(trig.sincos)


def _max_errors(x: np.ndarray) -> tuple[float, float]:
  sin, cos = _sincos(jnp.asarray(x))
  exact = x.astype(np.float64)
  return float(np.abs(np.asarray(sin) - np.sin(exact)).max()), float(np.abs(np.asarray(cos) - np.cos(exact)).max())


def test_rope_angles_up_to_position_2_to_the_17_are_within_one_ulp_of_1():
  head_dim = 128
  inv_freq = (1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
  angles = np.arange(-8, 2**17, dtype=np.float32)[:, None] * inv_freq  # [P, H/2], float32 as apply_rope has them
  assert max(_max_errors(angles)) < 1.5e-7  # float32 spacing at 1: 1.2e-7


@pytest.mark.parametrize("limit", [np.pi, 1e4, 2**17])
def test_random_angles(limit):
  x = np.random.default_rng(0).uniform(-limit, limit, 200_000).astype(np.float32)
  x[:4] = [0.0, np.pi / 2, -np.pi, 3 * np.pi / 2]  # quadrant boundaries
  assert max(_max_errors(x)) < 1.5e-7


def test_non_finite_angles_give_nan_and_other_dtypes_are_refused():
  sin, cos = _sincos(jnp.array([np.inf, -np.inf, np.nan], jnp.float32))
  assert np.isnan(sin).all() and np.isnan(cos).all()
  with pytest.raises(ValueError, match="float32 angles, got bfloat16"):
    trig.sincos(jnp.zeros(3, jnp.bfloat16))
