"""The CPU fast path advsweep takes by default: XLA flags (`attacks.xla_cpu`) and the tiled
max pool (`models.architectures.max_pool_tiled`), each the same numbers as the slow path;
and importing advsweep starts no JAX backend (the flags, and jax.distributed, need that)."""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep.attacks import xla_cpu
from advsweep.models import architectures


def test_flag_added_where_the_user_set_none():
  env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
  assert xla_cpu.apply_defaults(env, jaxlib_release=(0, 10))
  assert env["XLA_FLAGS"] == ("--xla_backend_optimization_level=0 "
                              + xla_cpu.YNN_CONVOLUTION_OFF)
  assert not xla_cpu.apply_defaults(env, jaxlib_release=(0, 10))  # once only


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="},  # the user's own choice
    {xla_cpu.OPT_OUT: "0"},
])
def test_flag_left_alone_when_the_user_decided(env):
  before = dict(env)
  assert not xla_cpu.apply_defaults(env, jaxlib_release=(0, 10))
  assert env == before


def test_flag_left_out_on_an_unmeasured_jaxlib():
  env: dict[str, str] = {}
  assert not xla_cpu.apply_defaults(env, jaxlib_release=(0, 9))
  assert not xla_cpu.apply_defaults(env, jaxlib_release=(1, 0))
  assert env == {}


def test_this_process_runs_with_the_flag():
  """Importing advsweep set it before the suite's first computation (tests/conftest.py)."""
  if xla_cpu._jaxlib_release() in xla_cpu.MEASURED_JAXLIB:
    assert "ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")


_CONVOLUTION_ROUTE = """
import os, jax, jax.numpy as jnp
import {module}
os.environ["XLA_FLAGS"] = os.environ.get("LATE_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
x, w = jnp.ones((8, 26, 26, 32)), jnp.ones((3, 3, 32, 32))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print("ynn" if "__ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text() else "xla")
"""


def _convolution_route(module: str, **extra_env: str) -> str:
  """Which kernel a convolution compiles to in a fresh interpreter that imported `module`
  first; `LATE_XLA_FLAGS` replaces XLA_FLAGS after that import, which XLA only heeds if the
  import left its backend unstarted."""
  if xla_cpu._jaxlib_release() not in xla_cpu.MEASURED_JAXLIB:
    pytest.skip("the flag is set only on the jaxlib releases it was measured on")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
  return subprocess.run(
      [sys.executable, "-c", _CONVOLUTION_ROUTE.format(module=module)],
      env={**env, **extra_env}, capture_output=True, text=True, check=True).stdout.split()[-1]


@pytest.mark.parametrize("module", ["advsweep.models", "advsweep.bench.evaluation.standard"])
def test_the_flag_reaches_xla_through_each_entry(module):
  """Importing the package applies the flag before anything it imports (evosax among them)
  starts JAX's backend: a convolution then compiles to XLA's own kernel, not YNNPACK's."""
  assert _convolution_route(module) == "xla"
  assert _convolution_route(module, **{xla_cpu.OPT_OUT: "0"}) == "ynn"  # what the flag changes


def test_importing_advsweep_starts_no_backend():
  """evosax's algorithms run JAX as they are imported; the one-pixel attack imports them
  when it runs, so importing the packages leaves the backend unstarted: flags set after the
  import (here with advsweep's own off) still reach XLA."""
  module = "advsweep.attacks, advsweep.models, advsweep.bench.evaluation.standard"
  assert _convolution_route(module, **{xla_cpu.OPT_OUT: "0",
                                       "LATE_XLA_FLAGS": xla_cpu.YNN_CONVOLUTION_OFF}) == "xla"


def _reference_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _tiled_pool(x):
  return architectures.max_pool_tiled(x, 2)


def _assert_same_derivatives(x, rng):
  """The tiled pool's VJP and JVP at `x` equal nn.max_pool's, bit for bit."""
  g = jnp.asarray(rng.random(_reference_pool(x).shape, np.float32))
  np.testing.assert_array_equal(jax.vjp(_tiled_pool, x)[1](g)[0],
                                jax.vjp(_reference_pool, x)[1](g)[0])
  t = jnp.asarray(rng.random(x.shape, np.float32))
  np.testing.assert_array_equal(jax.jvp(_tiled_pool, (x,), (t,))[1],
                                jax.jvp(_reference_pool, (x,), (t,))[1])


def test_tiled_pool_equals_max_pool_in_value_and_derivatives():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((3, 9, 11, 4), np.float32))  # odd sides: the cut rows too
  np.testing.assert_array_equal(_tiled_pool(x), _reference_pool(x))
  _assert_same_derivatives(x, rng)
  batched = jax.jit(jax.vmap(jax.grad(lambda v: _tiled_pool(v[None]).sum())))(x)
  np.testing.assert_array_equal(batched, jax.vmap(jax.grad(
      lambda v: _reference_pool(v[None]).sum()))(x))


def test_tiled_pool_sends_a_tie_to_the_first_maximum_as_max_pool_does():
  """Ties are common (a ReLU's constant background): the derivative must go where
  select-and-scatter (and PyTorch) send it, or a gradient attack takes another path."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.integers(0, 3, (2, 8, 6, 3)).astype(np.float32))  # ties everywhere
  _assert_same_derivatives(x, rng)
  one = jnp.ones((1, 2, 2, 1))
  np.testing.assert_array_equal(jax.grad(lambda v: _tiled_pool(v).sum())(one)[0, :, :, 0],
                                [[1.0, 0.0], [0.0, 0.0]])


def test_second_order_derivative_through_the_tiled_pool():
  """Gradient-of-gradient (GradAlign-style regularisers) goes through it."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((1, 4, 4, 1), np.float32))
  w = jnp.asarray(rng.random((1, 2, 2, 1), np.float32))

  def inner(v):
    return jnp.sum(_tiled_pool(v * v) * w)

  def inner_ref(v):
    return jnp.sum(_reference_pool(v * v) * w)

  outer = jax.grad(lambda v: jnp.sum(jax.grad(inner)(v) ** 2))(x)
  outer_ref = jax.grad(lambda v: jnp.sum(jax.grad(inner_ref)(v) ** 2))(x)
  np.testing.assert_allclose(outer, outer_ref, rtol=1e-6)
