"""`activation.activate`: the activations' values and gradients, plain and gated, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import runtime
from vlmjax.models import activation


@pytest.fixture(autouse=True)
def _cpu_path():
  """These tests hold the numerics written for XLA's CPU backend, whatever the backend (the standard path is
  JAX's own; tests/models/test_cpu_tuning.py holds the two against each other)."""
  with runtime.cpu_tuning(True):
    yield


F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [(name, gated) for name in sorted(activation.ACTIVATIONS) for gated in (False, True)]


def _inputs(dtype, shape=(4, 6, 32)):
  x, up, weights = (3 * jax.random.normal(jax.random.key(seed), shape) for seed in range(3))
  return x.astype(dtype), up.astype(dtype), weights.astype(dtype)


def _reference(name, x, up, weights):
  """The activation as jnp writes it, in the inputs' dtype, against weights (a scalar to differentiate)."""
  hidden = activation.ACTIVATIONS[name](x)
  hidden = hidden if up is None else hidden * up
  return (hidden.astype(F32) * weights.astype(F32)).sum()


def _ours(name, x, up, weights):
  return (activation.activate(name, x, up).astype(F32) * weights.astype(F32)).sum()


@pytest.mark.parametrize("name,gated", CASES)
def test_float32_values_and_gradients_are_the_plain_functions(name, gated):
  x, up, weights = _inputs(F32)
  up = up if gated else None
  argnums = (1, 2) if gated else 1
  ours = jax.value_and_grad(_ours, argnums)(name, x, up, weights)
  reference = jax.value_and_grad(_reference, argnums)(name, x, up, weights)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _assert_rounded_once(actual, expected):
  """actual (bfloat16) is expected (float32) rounded once: within half a bfloat16 step, give or take float32's own
  differences between two compilations (XLA's fused tanh, near the zeros of a gradient)."""
  assert actual.dtype == BF16
  expected = np.asarray(expected, np.float32)
  np.testing.assert_allclose(np.asarray(actual.astype(F32)), expected, rtol=2**-8, atol=2**-14 * np.abs(expected).max())


@pytest.mark.parametrize("name,gated", CASES)
def test_bfloat16_is_the_float32_computation_rounded_once(name, gated):
  """In bfloat16 the values and gradients (jitted, as a train step computes them) are float32's on the same
  rounded inputs, rounded once; the op-by-op bfloat16 chain rounds at every op and is off by up to hundreds of
  bfloat16 steps."""
  x, up, weights = _inputs(BF16)
  up = up if gated else None
  as_f32 = lambda a: None if a is None else a.astype(F32)
  _assert_rounded_once(jax.jit(activation.activate, static_argnums=0)(name, x, up),
                       activation.activate(name, as_f32(x), as_f32(up)))
  argnums = (1, 2) if gated else 1
  grads = jax.jit(jax.grad(_ours, argnums), static_argnums=0)(name, x, up, weights)
  expected = jax.grad(_reference, argnums)(name, as_f32(x), as_f32(up), as_f32(weights))
  for grad, expected_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    _assert_rounded_once(grad, expected_grad)
