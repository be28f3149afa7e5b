"""Sine and cosine together, in float32 arithmetic that XLA vectorizes.

Why our own: XLA's CPU backend evaluates `jnp.sin` and `jnp.cos` by calling the C library once per element (on
the development machine 7.4 ms for both over a [1792, 384] array, against 0.44 ms for this function), and RoPE's
rotation evaluates them inside each fused rotation, once per element of the queries and keys of every layer,
forward and backward: 14 ms of the shapes_tiny training step. This is Cephes' `sinf`/`cosf` scheme: the angle
reduced by multiples of pi/2 (Cody-Waite: pi/2 split in parts whose products with k are exact) and minimax
polynomials on [-pi/4, pi/4]; the quadrant picks which polynomial, and its sign, gives each.

Accuracy: within 1.1e-7 of the exact values (one float32 spacing at 1) for |x| up to 2**17, RoPE's angles up to
position 131072, against 3.3e-8 for the C library (tests/models/test_trig.py). Past that the reduction is no
longer exact and the error grows (0.03 at 1e6).
"""

import jax
import jax.numpy as jnp
import numpy as np

# pi/2 as the sum of five floats, the first four of 7 significant bits: k * part is exact for |k| < 2**17, with or
# without fused multiply-adds (XLA contracts them only at its default LLVM optimization level).
_PI_2 = tuple(np.float32(part) for part in (1.578125, -0.00732421875, -4.470348358154297e-06,
                                            1.5832483768463135e-08, 6.07710062827671e-11))
_SIN = tuple(np.float32(c) for c in (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4))
_COS = tuple(np.float32(c) for c in (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5))


def sincos(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sin(x), cos(x)) of float32 x, elementwise; any shape."""
  if x.dtype != jnp.float32:
    raise ValueError(f"sincos takes float32 angles, got {x.dtype}")
  quadrants = jnp.round(x * np.float32(2 / np.pi))
  r = x
  for part in _PI_2:
    r = r - quadrants * part  # x - quadrants * pi/2, in [-pi/4, pi/4]
  r2 = r * r
  sin_r = r + r * r2 * (_SIN[0] + r2 * (_SIN[1] + r2 * _SIN[2]))
  cos_r = 1 - 0.5 * r2 + r2 * r2 * (_COS[0] + r2 * (_COS[1] + r2 * _COS[2]))
  quadrant = quadrants.astype(jnp.int32) & 3  # x = r + quadrant * pi/2 (mod 2 pi)
  swap = (quadrant & 1) == 1  # quadrants 1 and 3: sin(x) = +-cos(r), cos(x) = -+sin(r)
  sin = jnp.where(swap, cos_r, sin_r)
  cos = jnp.where(swap, sin_r, cos_r)
  sin = jnp.where(quadrant >= 2, -sin, sin)  # quadrants 2 and 3
  cos = jnp.where((quadrant == 1) | (quadrant == 2), -cos, cos)
  return sin, cos
