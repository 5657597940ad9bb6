"""Exact pixel-local evaluation of any convolutional model, derived from its jaxpr: the
one-pixel attack's default evaluator (`splicer_for`).

The one-pixel attack's candidates differ from a clean image in one pixel, and a convolution
passes that change on only inside a window that grows with the receptive field (the locality
Su, Vargas and Sakurai's attack rests on). So a candidate needs the early, expensive layers
only on small windows. The structure is found in the computation itself, not in a list per
architecture, so it serves the zoo's sequential CNNs, residual networks and a user's own Flax
(or plain JAX) models alike.

`apply_fn` is traced once per parameter and image shape (`jax.make_jaxpr`, batch 1), its calls
(`jit`, `custom_jvp_call`, ...) are inlined, and every value that depends on the image is
classified:
- the image is a window of one pixel;
- an elementwise operation (BatchNorm in inference, ReLU, the input normalisation, a
  residual addition) keeps a window; where two windowed operands meet, the window is their
  union (a ResNet's skip connection);
- a convolution (NHWC, HWIO, no dilation or groups) grows the window by its kernel and
  rescales it by its stride. It is linear, so the change of its output is a dense product of
  the change of its input with the convolution's Toeplitz matrix on the flattened window (a
  GEMM, which runs at full speed on a CPU where a convolution over a 5x5 window does not);
  before a strided layer the window is shifted to the stride's phase, so every candidate
  uses the same matrix;
- a max, min or sum pool (`lax.reduce_window`) grows and rescales it too, and is recomputed
  on the window's input region;
- anything else that reads the image (a reshape to a dense layer, a global mean, a
  non-local block) ends the windows.
Each windowed value is carried as its new and its clean values on the window. At the split,
the windows still read later are spliced into the clean activations and the rest of the
computation runs as traced, on full maps. The split is the one with the lowest cost per
candidate (`TracedSplicer.plan_for`); window positions off a feature map never carry a
change (they are the next layer's padding). The result equals the full forward pass up to
float rounding (tested at every split, corners included). Candidates that change k > 1
pixels take the full forward pass: the windows of nearby pixels interact.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

# Calls whose body is inlined (evaluated equation by equation).
INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
ELEMENTWISE = frozenset({
    "abs", "add", "and", "atan2", "cbrt", "ceil", "clamp", "convert_element_type", "copy",
    "copy_p", "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1",
    "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt",
    "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision",
    "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "sub",
    "tan", "tanh", "xor"})
# Pools and the value their input is padded with.
POOLS = {"reduce_window_max": -np.inf, "reduce_window_min": np.inf, "reduce_window_sum": 0.0}
# Costs in full-map multiply-adds, measured on the 2-core CPU (XLA, mnist_lenet, 2048
# candidates): a multiply-add of a window's Toeplitz product costs about one in a full-map
# convolution, and copying one activation (a window gathered from the clean maps, or the
# clean map the window is spliced into) about 100.
TOEPLITZ_COST = 1
COPY_COST = 100
ELEMENT_COST = 1  # an elementwise operation on one activation
MAX_TOEPLITZ_BYTES = 256 * 2 ** 20  # splits whose matrices need more are not considered
NHWC, HWIO = (0, 3, 1, 2), (3, 2, 0, 1)  # lax's dimension numbers of flax's convolutions


# -- the program: the jaxpr with its calls inlined, values numbered --------------------------

@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand."""

  value: Any


@dataclasses.dataclass(frozen=True)
class Eqn:
  prim: Any
  ins: tuple[int | Lit, ...]
  outs: tuple[int, ...]
  params: dict[str, Any]

  def bind(self, *args: Any) -> list[Any]:
    out = self.prim.bind(*args, **self.params)
    return list(out) if self.prim.multiple_results else [out]


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """`apply_fn(params, image[1,H,W,C])` as a flat list of equations over numbered values."""

  eqns: tuple[Eqn, ...]
  shapes: dict[int, tuple[int, ...]]
  consts: dict[int, Any]  # the jaxpr's own constants
  param_ids: tuple[int, ...]  # the params' leaves, in tree order
  image: int
  output: int | Lit


def trace(apply_fn: Callable, params: Any, image_shape: Sequence[int]) -> Program:
  """The program of `apply_fn` on one image of `image_shape` (shapes of `params` only)."""
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                       params)
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  closed = jax.make_jaxpr(apply_fn)(specs, image)
  counter = itertools.count()
  eqns: list[Eqn] = []
  shapes: dict[int, tuple[int, ...]] = {}
  consts: dict[int, Any] = {}

  def new(var) -> int:
    i = next(counter)
    shapes[i] = tuple(var.aval.shape)
    return i

  def emit(jaxpr, const_values, inputs) -> list[int | Lit]:
    env: dict[Any, int | Lit] = {}
    for var, value in zip(jaxpr.constvars, const_values, strict=True):
      env[var] = new(var)
      consts[env[var]] = value
    env.update(zip(jaxpr.invars, inputs, strict=True))

    def read(var):
      return Lit(var.val) if isinstance(var, core.Literal) else env[var]

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      body = eqn.params.get(INLINED.get(eqn.primitive.name, ""))
      if body is not None:
        inner = body if isinstance(body, core.Jaxpr) else body.jaxpr
        inner_consts = () if isinstance(body, core.Jaxpr) else body.consts
        env.update(zip(eqn.outvars, emit(inner, inner_consts, ins), strict=True))
        continue
      outs = [new(v) for v in eqn.outvars]
      env.update(zip(eqn.outvars, outs, strict=True))
      eqns.append(Eqn(eqn.primitive, tuple(ins), tuple(outs), dict(eqn.params)))
    return [read(v) for v in jaxpr.outvars]

  inputs = [new(v) for v in closed.jaxpr.invars]
  (output,) = emit(closed.jaxpr, closed.consts, inputs)
  return Program(tuple(eqns), shapes, consts, tuple(inputs[:-1]), inputs[-1], output)


def _value(env: dict[int, Any], ref: int | Lit) -> Any:
  return ref.value if isinstance(ref, Lit) else env[ref]


def _constants(program: Program, params: Any) -> dict[int, Any]:
  """Every value that does not depend on the image, from `params`."""
  env = dict(program.consts)
  env.update(zip(program.param_ids, jax.tree.leaves(params), strict=True))
  for eqn in program.eqns:
    if all(isinstance(r, Lit) or r in env for r in eqn.ins):
      env.update(zip(eqn.outs, eqn.bind(*(_value(env, r) for r in eqn.ins)), strict=True))
  return env


# -- window geometry, one spatial axis at a time ---------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Axis:
  """A window of `window` positions on a map of `size`, starting at `origins[p]` for the
  pixel at coordinate p of the image (negative or past the map where it hangs off)."""

  window: int
  origins: np.ndarray
  size: int

  def same(self, other: Axis) -> bool:
    return self.window == other.window and np.array_equal(self.origins, other.origins)

  def margin(self) -> tuple[int, int]:
    """Padding of the map that keeps every window inside it."""
    return (max(0, -int(self.origins.min())),
            max(0, int(self.origins.max()) + self.window - self.size))


def _union(axes: Sequence[Axis]) -> Axis:
  start = np.min([a.origins for a in axes], axis=0)
  end = np.max([a.origins + a.window for a in axes], axis=0)
  return Axis(int(np.max(end - start)), start, axes[0].size)


@dataclasses.dataclass(frozen=True, eq=False)
class ConvAxis:
  """A strided layer's window on one axis: the input window moved back by `shift` to the
  stride's phase (`aligned` positions), so that one Toeplitz matrix serves every pixel."""

  shift: np.ndarray
  aligned: int
  out: Axis
  stride: int
  kernel: int


def _conv_axis(axis: Axis, kernel: int, stride: int, low: int, out_size: int) -> ConvAxis:
  shift = (axis.origins + low) % stride
  aligned = axis.window + stride - 1
  steps = (kernel - 1) // stride
  origins = (axis.origins - shift + low) // stride - steps
  return ConvAxis(shift, aligned, Axis((aligned - 1) // stride + steps + 1, origins, out_size),
                  stride, kernel)


@dataclasses.dataclass(frozen=True, eq=False)
class PoolAxis:
  """A pool's window on one axis and the input region it reads (`start`, `region`)."""

  out: Axis
  start: np.ndarray
  region: int
  size_in: int


def _pool_axis(axis: Axis, kernel: int, stride: int, low: int, out_size: int) -> PoolAxis:
  first = -((-(axis.origins + low - kernel + 1)) // stride)
  last = (axis.origins + axis.window - 1 + low) // stride
  window = int(np.max(last - first + 1))
  return PoolAxis(Axis(window, first, out_size), first * stride - low,
                  (window - 1) * stride + kernel, axis.size)


def _toeplitz(kernel: jax.Array, axes: tuple[ConvAxis, ConvAxis]) -> jax.Array:
  """The convolution from an aligned input window to its output window, as a matrix
  [A_r * A_c * C_in, T_r * T_c * C_out]: output y reads aligned input y * stride - reach +
  kappa for kernel tap kappa (window coordinates)."""
  def taps(axis: ConvAxis):
    reach = (axis.kernel - 1) // axis.stride * axis.stride
    tap = (np.arange(axis.aligned)[:, None] - np.arange(axis.out.window)[None] * axis.stride
           + reach)
    return np.clip(tap, 0, axis.kernel - 1), (tap >= 0) & (tap < axis.kernel)

  (tap_r, valid_r), (tap_c, valid_c) = taps(axes[0]), taps(axes[1])
  matrix = kernel[tap_r[:, None, :, None], tap_c[None, :, None, :]]
  mask = valid_r[:, None, :, None] & valid_c[None, :, None, :]
  matrix = matrix * jnp.asarray(mask[..., None, None], kernel.dtype)
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  return matrix.transpose(0, 1, 4, 2, 3, 5).reshape(
      axes[0].aligned * axes[1].aligned * c_in, axes[0].out.window * axes[1].out.window * c_out)


# -- analysis: which values are windows, at what cost ----------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Step:
  """How an equation that reads the image runs on windows (kind "global": it cannot)."""

  kind: str  # "elementwise", "conv", "pool" or "global"
  window_cost: int = 0  # per candidate, on windows
  full_cost: int = 0  # per candidate, on full maps
  axes: tuple[Any, Any] | None = None  # Axis (elementwise), ConvAxis or PoolAxis per axis


def _spatial(shape: tuple[int, ...]) -> bool:
  return len(shape) == 4 and shape[0] == 1


def _broadcasts_over_space(shape: tuple[int, ...]) -> bool:
  """A constant that is the same at every position: a scalar, or size 1 on both axes."""
  return len(shape) == 0 or (len(shape) == 4 and shape[0] == 1 and shape[1] == shape[2] == 1)


@dataclasses.dataclass(frozen=True, eq=False)
class Analysis:
  program: Program
  steps: tuple[Step | None, ...]  # None: the equation does not read the image
  axes: dict[int, tuple[Axis, Axis]]  # each windowed value's window
  full_macs: int


def analyse(program: Program, image_shape: Sequence[int]) -> Analysis:
  height, width = image_shape[0], image_shape[1]
  axes = {program.image: (Axis(1, np.arange(height), height), Axis(1, np.arange(width), width))}
  image_dependent = {program.image}
  steps: list[Step | None] = []
  for eqn in program.eqns:
    reads = [r for r in eqn.ins if not isinstance(r, Lit) and r in image_dependent]
    if not reads:
      steps.append(None)
      continue
    image_dependent.update(eqn.outs)
    step = _step(program, eqn, axes) if all(r in axes for r in reads) else None
    if step is None:
      step = Step("global", full_cost=int(np.prod(program.shapes[eqn.outs[0]])))
    else:
      axes[eqn.outs[0]] = tuple(a if isinstance(a, Axis) else a.out for a in step.axes)
    steps.append(step)
  full = sum(s.full_cost for s in steps if s is not None)
  return Analysis(program, tuple(steps), axes, full)


def _step(program: Program, eqn: Eqn, axes: dict[int, tuple[Axis, Axis]]) -> Step | None:
  """The windowed form of `eqn`, whose image-dependent inputs are all windows, or None."""
  name = eqn.prim.name
  out_shape = program.shapes[eqn.outs[0]]
  if len(eqn.outs) != 1 or not _spatial(out_shape):
    return None
  positions, channels = out_shape[1] * out_shape[2], out_shape[3]
  if name in ELEMENTWISE:
    windowed = [r for r in eqn.ins if not isinstance(r, Lit) and r in axes]
    others = [r for r in eqn.ins if isinstance(r, Lit) or r not in axes]
    if any(program.shapes[r][1:3] != out_shape[1:3] for r in windowed) or not all(
        _broadcasts_over_space(np.shape(r.value) if isinstance(r, Lit) else program.shapes[r])
        for r in others):
      return None
    out = tuple(_union([axes[r][i] for r in windowed]) for i in range(2))
    area = out[0].window * out[1].window * channels
    extended = sum(not (axes[r][0].same(out[0]) and axes[r][1].same(out[1])) for r in windowed)
    return Step("elementwise", 2 * ELEMENT_COST * area + COPY_COST * area * extended,
                ELEMENT_COST * positions * channels, out)
  if name == "conv_general_dilated":
    lhs, rhs = eqn.ins
    p = eqn.params
    numbers = p["dimension_numbers"]
    if (isinstance(lhs, Lit) or lhs not in axes or isinstance(rhs, Lit) or rhs in axes
        or tuple(numbers.lhs_spec) != NHWC or tuple(numbers.out_spec) != NHWC
        or tuple(numbers.rhs_spec) != HWIO or any(d != 1 for d in p["lhs_dilation"])
        or any(d != 1 for d in p["rhs_dilation"]) or p["feature_group_count"] != 1
        or p["batch_group_count"] != 1):
      return None
    kernel = program.shapes[rhs]
    conv = tuple(_conv_axis(axes[lhs][i], kernel[i], p["window_strides"][i],
                            p["padding"][i][0], out_shape[1 + i]) for i in range(2))
    c_in = kernel[2]
    aligned = conv[0].aligned * conv[1].aligned * c_in
    out_area = conv[0].out.window * conv[1].out.window * channels
    cost = TOEPLITZ_COST * aligned * out_area + COPY_COST * out_area + ELEMENT_COST * aligned
    if any(a.stride > 1 for a in conv):
      cost += COPY_COST * aligned
    return Step("conv", cost, positions * channels * kernel[0] * kernel[1] * c_in, conv)
  if name in POOLS:
    (operand,) = eqn.ins
    p = eqn.params
    dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if (dims[0] != 1 or dims[3] != 1 or strides[0] != 1 or strides[3] != 1
        or any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"])
        or tuple(pads[0]) != (0, 0) or tuple(pads[3]) != (0, 0)):
      return None
    pool = tuple(_pool_axis(axes[operand][i], dims[1 + i], strides[1 + i], pads[1 + i][0],
                            out_shape[1 + i]) for i in range(2))
    region = pool[0].region * pool[1].region * channels
    out_area = pool[0].out.window * pool[1].out.window * channels
    return Step("pool", 2 * COPY_COST * region + 2 * dims[1] * dims[2] * out_area,
                positions * channels * dims[1] * dims[2], pool)
  return None


# -- the plan: where to split ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """A split of the program: equations [0, split) run on windows (0: the full forward pass).

  `live`: the windowed values the rest reads (spliced into their clean maps); `gathers`:
  (value, pad value) -> the margins of the clean map that windows are read from; `macs` and
  `full_macs`: the cost per candidate and that of a full forward pass (multiply-adds, copies
  weighted by `COPY_COST`).
  """

  split: int
  analysis: Analysis = dataclasses.field(repr=False)
  live: tuple[int, ...] = ()
  gathers: dict[tuple[int, float], tuple[tuple[int, int], tuple[int, int]]] = (
      dataclasses.field(default_factory=dict, repr=False))
  macs: int = 0

  @property
  def full_macs(self) -> int:
    return self.analysis.full_macs


def _margins(axes: tuple[Axis, Axis]) -> tuple[tuple[int, int], tuple[int, int]]:
  return axes[0].margin(), axes[1].margin()


def _widest(a, b):
  return tuple((max(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b, strict=True))


def plan_at(analysis: Analysis, split: int) -> Plan | None:
  """The plan of `split`, or None where an equation before it cannot run on windows (or its
  Toeplitz matrices exceed `MAX_TOEPLITZ_BYTES`)."""
  program, steps = analysis.program, analysis.steps
  if split == 0:  # the full pass, on images with the pixel set
    image_copy = COPY_COST * int(np.prod(program.shapes[program.image][1:]))
    return Plan(0, analysis, macs=analysis.full_macs + image_copy)
  before = [i for i in range(split) if steps[i] is not None]
  if any(steps[i].kind == "global" for i in before):
    return None
  produced = {program.image} | {program.eqns[i].outs[0] for i in before}
  used_later = {r for eqn in program.eqns[split:] for r in eqn.ins if not isinstance(r, Lit)}
  if not isinstance(program.output, Lit):
    used_later.add(program.output)
  live = tuple(sorted(produced & used_later))
  gathers: dict[tuple[int, float], Any] = {}

  def need(value: int, pad: float, margins) -> None:
    key = (value, pad)
    gathers[key] = _widest(gathers[key], margins) if key in gathers else margins

  toeplitz_bytes = 0
  for i in before:
    eqn, step = program.eqns[i], steps[i]
    out = analysis.axes[eqn.outs[0]]
    if step.kind == "conv":
      need(eqn.outs[0], 0.0, _margins(out))
      sizes = [a.aligned for a in step.axes] + [a.out.window for a in step.axes]
      kernel = program.shapes[eqn.ins[1]]
      toeplitz_bytes += 4 * int(np.prod(sizes)) * kernel[2] * kernel[3]
    elif step.kind == "pool":
      region = tuple(Axis(a.region, a.start, a.size_in) for a in step.axes)
      need(eqn.ins[0], POOLS[eqn.prim.name], _margins(region))
    else:
      for r in eqn.ins:
        if not isinstance(r, Lit) and r in analysis.axes and r in produced and not (
            analysis.axes[r][0].same(out[0]) and analysis.axes[r][1].same(out[1])):
          need(r, 0.0, _margins(out))
  if toeplitz_bytes > MAX_TOEPLITZ_BYTES:
    return None
  cost = sum(steps[i].window_cost for i in before)
  cost += sum(COPY_COST * int(np.prod(program.shapes[v][1:])) for v in live)
  cost += sum(s.full_cost for s in steps[split:] if s is not None)
  return Plan(split, analysis, live, gathers, int(cost))


# -- the evaluator -----------------------------------------------------------------------------

class PixelSplicer:
  """Exact logits of images that differ from clean ones in one pixel, for any `apply_fn`
  whose early layers are convolutions, pools and elementwise operations (see module doc):
  the one-pixel attack's `evaluator=`. A model with no such layer gets split 0 (the full
  forward pass) from `plan_for`."""

  def __init__(self, apply_fn: Callable[[Any, jax.Array], jax.Array]):
    self.apply_fn = apply_fn
    self._analyses: dict[Any, Analysis] = {}
    self._plans: dict[Any, dict[int, Plan]] = {}

  @staticmethod
  def _key(params: Any, image_shape: Sequence[int]) -> Any:
    shapes = tuple((tuple(jnp.shape(a)), str(jnp.result_type(a)))
                   for a in jax.tree.leaves(params))
    return jax.tree.structure(params), shapes, tuple(int(d) for d in image_shape)

  def analysis(self, params: Any, image_shape: Sequence[int]) -> Analysis:
    """The traced program and its windows, for concrete or traced `params` (shapes only)."""
    key = self._key(params, image_shape)
    if key not in self._analyses:
      self._analyses[key] = analyse(trace(self.apply_fn, params, image_shape), image_shape)
    return self._analyses[key]

  def _plans_of(self, params: Any, image_shape: Sequence[int]) -> dict[int, Plan]:
    """The plan of every split that can run, by split, built once per shape: 0, then each
    point after an equation that reads the image, up to the first that cannot run on
    windows (or whose Toeplitz matrices would exceed `MAX_TOEPLITZ_BYTES`)."""
    key = self._key(params, image_shape)
    if key not in self._plans:
      analysis = self.analysis(params, image_shape)
      plans = {0: plan_at(analysis, 0)}
      for i, step in enumerate(analysis.steps):
        if step is None:
          continue
        plan = None if step.kind == "global" else plan_at(analysis, i + 1)
        if plan is None:
          break
        plans[i + 1] = plan
      self._plans[key] = plans
    return self._plans[key]

  def full_reason(self, params: Any, image_shape: Sequence[int]) -> str | None:
    """Why one-pixel candidates of this model take the full forward pass (None: they do
    not): the first operation that reads the whole image, or no split cheaper than the
    full pass."""
    plans = self._plans_of(params, image_shape)
    if min(plans.values(), key=lambda p: p.macs).split != 0:
      return None
    analysis = self.analysis(params, image_shape)
    for eqn, step in zip(analysis.program.eqns, analysis.steps, strict=True):
      if step is not None and step.kind == "global":
        return (f"its first image-wide operation, {eqn.prim.name}, comes before any "
                "convolution or pool (a dense or global first layer)")
    return "no split point is cheaper than the full forward pass"

  def splits(self, params: Any, image_shape: Sequence[int]) -> list[int]:
    """Every split that can run (see `_plans_of`), in order."""
    return list(self._plans_of(params, image_shape))

  def plan_for(self, params: Any, image_shape: Sequence[int], num_pixels: int,
               split: int | None = None) -> Plan:
    """The split with the lowest cost per candidate (or the given `split`); only one-pixel
    candidates are split (k > 1 runs the full forward pass: split 0)."""
    plans = self._plans_of(params, image_shape)
    if num_pixels != 1:
      return plans[0]
    if split is None:
      return min(plans.values(), key=lambda p: p.macs)
    if split not in plans:
      raise ValueError(
          f"split {split} cannot run on windows, or its Toeplitz matrices would exceed "
          f"{MAX_TOEPLITZ_BYTES >> 20} MiB; pick one of {list(plans)} (the earlier ones are "
          "smaller)")
    return plans[split]

  def clean_state(self, params: Any, images: jax.Array, plan: Plan) -> dict[str, Any]:
    """Per image, the clean maps that windows are read from (padded) and those the live
    windows are spliced into; per convolution before the split, its Toeplitz matrix."""
    state: dict[str, Any] = {"images": images}
    if plan.split == 0:
      return state
    program, steps = plan.analysis.program, plan.analysis.steps
    env = _constants(program, params)
    env[program.image] = images
    toeplitz = {}
    for i in range(plan.split):
      if steps[i] is None:
        continue
      eqn = program.eqns[i]
      env.update(zip(eqn.outs, eqn.bind(*(_value(env, r) for r in eqn.ins)), strict=True))
      if steps[i].kind == "conv":
        toeplitz[i] = _toeplitz(env[eqn.ins[1]], steps[i].axes)
    state["toeplitz"] = toeplitz
    state["maps"] = {key: jnp.pad(env[key[0]], ((0, 0), *margins, (0, 0)),
                                  constant_values=key[1])
                     for key, margins in plan.gathers.items()}
    state["live"] = {v: env[v] for v in plan.live}
    return state

  def logits(self, params: Any, state: dict[str, Any], ids: jax.Array, rows: jax.Array,
             cols: jax.Array, colours: jax.Array, plan: Plan) -> jax.Array:
    """Logits of clean images `ids` with k pixels set (`rows`, `cols` [N, k], `colours`
    [N, k, C]); k > 1 takes the full forward pass (the plan's split is 0)."""
    images = state["images"][ids]
    if plan.split == 0:
      batch = jnp.arange(images.shape[0])[:, None]
      return self.apply_fn(params, images.at[batch, rows, cols].set(colours))
    program, analysis = plan.analysis.program, plan.analysis
    row, col = rows[:, 0], cols[:, 0]
    env = _constants(program, params)
    pixel = images[jnp.arange(ids.shape[0]), row, col][:, None, None, :]
    windows = {program.image: (colours[:, 0][:, None, None, :], pixel)}
    for i in range(plan.split):
      step = analysis.steps[i]
      if step is None:
        continue
      eqn = program.eqns[i]
      run = {"conv": _conv, "pool": _pool, "elementwise": _elementwise}[step.kind]
      windows[eqn.outs[0]] = run(plan, state, env, windows, i, ids, row, col)
    spliced = []
    for v in plan.live:
      axes = analysis.axes[v]
      spliced.append(jax.vmap(_place)(state["live"][v][ids], windows[v][0],
                                      jnp.asarray(axes[0].origins)[row],
                                      jnp.asarray(axes[1].origins)[col]))
    rest = [eqn for eqn, step in zip(program.eqns[plan.split:], analysis.steps[plan.split:],
                                     strict=True) if step is not None]

    def tail(*values):
      local = dict(env)
      local.update((v, x[None]) for v, x in zip(plan.live, values, strict=True))
      for eqn in rest:
        local.update(zip(eqn.outs, eqn.bind(*(_value(local, r) for r in eqn.ins)), strict=True))
      return _value(local, program.output)[0]

    return jax.vmap(tail)(*spliced)


def _origins(axes: tuple[Any, Any], row: jax.Array, col: jax.Array) -> tuple[jax.Array, ...]:
  return jnp.asarray(axes[0].origins)[row], jnp.asarray(axes[1].origins)[col]


def _gather(maps: jax.Array, ids: jax.Array, rows: jax.Array, cols: jax.Array,
            size: tuple[int, int]) -> jax.Array:
  """[N, size, C] windows of `maps[ids]` starting at (rows, cols)."""
  channels = maps.shape[-1]
  return jax.vmap(lambda i, r, c: lax.dynamic_slice(
      maps, (i, r, c, 0), (1, *size, channels))[0])(ids, rows, cols)


def _read(plan: Plan, state, value: int, pad: float, axes: tuple[Axis, Axis], ids, row, col
          ) -> jax.Array:
  """The clean windows `axes` of `value` (from its map padded with `pad`)."""
  margins = plan.gathers[(value, pad)]
  start_r, start_c = _origins(axes, row, col)
  return _gather(state["maps"][(value, pad)], ids, start_r + margins[0][0],
                 start_c + margins[1][0], (axes[0].window, axes[1].window))


def _on_map(axes: tuple[Axis, Axis], row: jax.Array, col: jax.Array) -> jax.Array:
  """[N, T_r, T_c, 1] the window positions that lie on the map."""
  start_r, start_c = _origins(axes, row, col)
  in_r = _in_range(start_r[:, None] + jnp.arange(axes[0].window), axes[0].size)
  in_c = _in_range(start_c[:, None] + jnp.arange(axes[1].window), axes[1].size)
  return (in_r[:, :, None] & in_c[:, None, :])[..., None]


def _in_range(values: jax.Array, size: int) -> jax.Array:
  return (values >= 0) & (values < size)


def _place(base: jax.Array, window: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
  """`base` [H,W,C] with `window` [T_r,T_c,C] at (row, col), parts off `base` dropped (a
  select, which XLA fuses with the gather that made `base`)."""
  size_r, size_c = window.shape[:2]
  rel_r = jnp.arange(base.shape[0]) - row
  rel_c = jnp.arange(base.shape[1]) - col
  inside = _in_range(rel_r, size_r)[:, None] & _in_range(rel_c, size_c)[None]
  placed = window[jnp.clip(rel_r, 0, size_r - 1)[:, None], jnp.clip(rel_c, 0, size_c - 1)[None]]
  return jnp.where(inside[..., None], placed, base)


def _elementwise(plan, state, env, windows, i, ids, row, col):
  """New and clean values of an elementwise equation, its windowed operands brought to the
  union window (their clean values around them)."""
  analysis = plan.analysis
  eqn = analysis.program.eqns[i]
  out = analysis.axes[eqn.outs[0]]
  news, cleans = [], []
  for r in eqn.ins:
    if isinstance(r, Lit) or r not in windows:
      news.append(_value(env, r))
      cleans.append(news[-1])
      continue
    new, clean = windows[r]
    axes = analysis.axes[r]
    if not (axes[0].same(out[0]) and axes[1].same(out[1])):
      big = _read(plan, state, r, 0.0, out, ids, row, col)
      off_r, off_c = (a - b for a, b in zip(_origins(axes, row, col), _origins(out, row, col),
                                            strict=True))
      new, clean = jax.vmap(_place)(big, new, off_r, off_c), big
    news.append(new)
    cleans.append(clean)
  return eqn.bind(*news)[0], eqn.bind(*cleans)[0]


def _conv(plan, state, env, windows, i, ids, row, col):
  """A convolution's change as the Toeplitz product of its input's change, added to the
  clean output window."""
  analysis = plan.analysis
  eqn = analysis.program.eqns[i]
  step = analysis.steps[i]
  lhs = eqn.ins[0]
  new, clean = windows[lhs]
  change = jnp.where(_on_map(analysis.axes[lhs], row, col), new - clean, 0.0)
  if any(a.stride > 1 for a in step.axes):
    aligned = jnp.zeros((change.shape[0], step.axes[0].aligned, step.axes[1].aligned,
                         change.shape[-1]), change.dtype)
    change = jax.vmap(_place)(aligned, change, jnp.asarray(step.axes[0].shift)[row],
                              jnp.asarray(step.axes[1].shift)[col])
  out = analysis.axes[eqn.outs[0]]
  clean_out = _read(plan, state, eqn.outs[0], 0.0, out, ids, row, col)
  delta = (change.reshape(change.shape[0], -1) @ state["toeplitz"][i]).reshape(clean_out.shape)
  return clean_out + delta.astype(clean_out.dtype), clean_out


def _pool(plan, state, env, windows, i, ids, row, col):
  """A pool recomputed on its input region, the new window placed where it is on the map."""
  analysis = plan.analysis
  eqn = analysis.program.eqns[i]
  step = analysis.steps[i]
  operand = eqn.ins[0]
  pad = POOLS[eqn.prim.name]
  new, _ = windows[operand]
  new = jnp.where(_on_map(analysis.axes[operand], row, col), new, pad)
  region = tuple(Axis(a.region, a.start, a.size_in) for a in step.axes)
  clean_region = _read(plan, state, operand, pad, region, ids, row, col)
  in_r, in_c = _origins(analysis.axes[operand], row, col)
  start_r, start_c = _origins(region, row, col)
  new_region = jax.vmap(_place)(clean_region, new, in_r - start_r, in_c - start_c)
  valid = dataclasses.replace(eqn, params={**eqn.params, "padding": ((0, 0),) * 4})
  return valid.bind(new_region)[0], valid.bind(clean_region)[0]


@functools.lru_cache(maxsize=64)
def _cached_splicer(apply_fn: Callable[[Any, jax.Array], jax.Array]) -> PixelSplicer:
  return PixelSplicer(apply_fn)


def splicer_for(apply_fn: Callable[[Any, jax.Array], jax.Array]) -> PixelSplicer:
  """The `PixelSplicer` of `apply_fn`, one per function (equal functions share it: a zoo
  model's `ApplyFn` compares by module), so a sweep analyses each model once; its plans are
  kept per parameter structure and image shape. An unhashable `apply_fn` gets a new one."""
  try:
    return _cached_splicer(apply_fn)
  except TypeError:
    return PixelSplicer(apply_fn)
