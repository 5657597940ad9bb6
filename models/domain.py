"""Domain adaptation by the maximum mean discrepancy (Ciprijanovic et al., "DeepAdversaries";
the multi-kernel MMD of Long et al. 2015, "Learning Transferable Features with Deep
Adaptation Networks"): a training loss that pulls the latent features of a noisy domain
toward those of the clean one, so that a model trained on clean labelled images keeps its
accuracy on noisy ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KERNEL_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of the mean squared distance


def mmd(x: jax.Array, y: jax.Array, scales: tuple[float, ...] = KERNEL_SCALES) -> jax.Array:
  """The squared MMD between samples x [N, D] and y [M, D] under a sum of Gaussian kernels.

  The biased estimator `mean k(x, x') + mean k(y, y') - 2 mean k(x, y)` (zero for identical
  samples, non-negative); the kernels' bandwidths are `scales` times the mean squared
  distance of the pooled samples, held constant in the gradient (Long et al.'s choice).
  """
  z = jnp.concatenate([x, y])
  sq = jnp.sum(z * z, -1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
  n = z.shape[0]
  base = jax.lax.stop_gradient(jnp.sum(d2) / (n * n - n))
  kernel = sum(jnp.exp(-d2 / (s * base + 1e-12)) for s in scales)
  nx = x.shape[0]
  return (kernel[:nx, :nx].mean() + kernel[nx:, nx:].mean()
          - 2 * kernel[:nx, nx:].mean())
