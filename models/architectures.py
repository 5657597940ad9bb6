"""Flax modules of the zoo. Inputs are NHWC images in [0, 1]; outputs are logits.

Each module normalises its own input, so attacks work in [0, 1] pixel space. Every layer's
post-activation output is sown into the `intermediates` collection under a stable name, so
analyses can read all layers with `mutable=["intermediates"]` (see `models.zoo.Model`).
`train=True` switches BatchNorm to batch statistics (and updates `batch_stats`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _scaled(channels: int, width: float) -> int:
  return max(1, round(channels * width))


def _normalize(x: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


SOFTMAX, GAUSS = "softmax", "gauss"
HEADS = (SOFTMAX, GAUSS)


def gauss_logits(features: jnp.ndarray, centroids: jnp.ndarray,
                 log_gamma: jnp.ndarray | float = 0.0) -> jnp.ndarray:
  """The Gauss network's output in log space: `-gamma ||phi(x) - c_k||^2` per class [B, K].

  Hess, Duivesteijn and Mocanu show that a softmax layer assigns a point to the cone of its
  class, as k-means with centroids at equal distance from the origin would, whatever the
  point's distance to the centroid. Their Centroid Based Tailoring replaces the softmax
  output by a Gaussian kernel of the distance to learned class centroids,
  `exp(-||phi(x) - c_k||^2)`. We return its logarithm, so argmax, the attacks' losses and a
  softmax over classes (the soft k-means assignment) all work on it unchanged. `gamma`
  (given as its log) is the kernel's inverse bandwidth; `GaussHead` learns it, starting at
  1 / feature dimension so that initial distances are of order one (at gamma = 1 the
  confidences of a fresh network are all near zero and its BCE has no gradient that tells
  the classes apart: a ResNet-20 stayed at chance for 60 steps where the softmax reached
  28%).

  References: Hess, Duivesteijn, Mocanu, Softmax-based Classification is k-means
  Clustering: Formal Proof, Consequences for Adversarial Attacks, and Improvement through
  Centroid Based Tailoring, 2020.
  """
  squared = (jnp.sum(features ** 2, -1, keepdims=True) - 2 * features @ centroids.T
             + jnp.sum(centroids ** 2, -1))
  return -jnp.exp(log_gamma) * jnp.maximum(squared, 0.0)


def gauss_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Per-image binary cross-entropy of the Gauss confidences `exp(logits)` against one-hot
  labels: it pulls the features onto their class's centroid and pushes them off the others
  (Hess et al.'s Gauss network; `gauss_logits`)."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  log_p = logits                                   # log exp(-d^2)
  log_not_p = jnp.log(-jnp.expm1(jnp.minimum(logits, -1e-6)))  # log(1 - exp(-d^2))
  return -jnp.sum(onehot * log_p + (1 - onehot) * log_not_p, -1)


def penultimate(intermediates: Mapping[str, Any]) -> jnp.ndarray:
  """[B, D] the latent features: the last sown layer before the logits, averaged over
  positions where it is a feature map (what a global-pooling head sees).

  Args:
    intermediates: the `intermediates` collection of an `apply(..., mutable=[...])`, or the
      flat dict of `zoo.Model.intermediates`; layers in the order they were sown.
  """
  names = [k for k in intermediates if k != "logits"]
  if not names:
    raise ValueError("the model sows no layer before its logits: it has no latent space")
  act = intermediates[names[-1]]
  act = act[0] if isinstance(act, tuple) else act
  return act.mean((1, 2)) if act.ndim == 4 else act.reshape(act.shape[0], -1)


class GaussHead(nn.Module):
  """Class centroids in feature space and the kernel's log inverse bandwidth; outputs
  `gauss_logits` (Hess et al.)."""

  num_classes: int

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    dim = features.shape[-1]
    centroids = self.param("centroids", nn.initializers.normal(1.0),
                           (self.num_classes, dim), features.dtype)
    log_gamma = self.param("log_gamma", nn.initializers.constant(-jnp.log(dim)), (),
                           features.dtype)
    return gauss_logits(features, centroids, log_gamma)


def _classifier(head: str, num_classes: int, name: str) -> nn.Module:
  if head == SOFTMAX:
    return nn.Dense(num_classes, name=name)
  if head == GAUSS:
    return GaussHead(num_classes, name="gauss")
  raise ValueError(f"unknown head {head!r}; valid choices: {', '.join(HEADS)}")


class SoftmaxRegression(nn.Module):
  """The shallow softmax (multinomial logistic regression) of Goodfellow et al. (2015).

  It reads raw [0, 1] pixels, as in the paper's FGSM table.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes, name="dense")(x)
    self.sow("intermediates", "logits", logits)
    return logits


class PapernotLeNet(nn.Module):
  """The MNIST network of Papernot et al. (2016), Table 1 (312k parameters).

  conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc10, 3x3 valid convolutions, ReLU.

  References: Papernot et al., The Limitations of Deep Learning in Adversarial Settings,
  EuroS&P 2016.
  """

  num_classes: int = 10
  mean: Sequence[float] = MNIST_MEAN
  std: Sequence[float] = MNIST_STD
  head: str = SOFTMAX  # or GAUSS: Hess et al.'s Gauss network (`GaussHead`) on fc2

  # (name, features, kernel, strides, padding) or a pool, as in `_conv_stack`.
  LAYERS = (("conv1", 32, 3, 1, "VALID"), ("conv2", 32, 3, 1, "VALID"), "pool:max2",
            ("conv3", 64, 3, 1, "VALID"), ("conv4", 64, 3, 1, "VALID"), "pool:max2")

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = _normalize(x, self.mean, self.std)
    for spec in self.LAYERS:
      if spec == "pool:max2":
        x = max_pool_tiled(x, 2)
        continue
      name, features, kernel, strides, padding = spec
      x = nn.relu(nn.Conv(features, (kernel, kernel), (strides, strides), padding=padding,
                          name=name)(x))
      self.sow("intermediates", f"{name}_act", x)
    x = x.reshape((x.shape[0], -1))
    for i in range(2):
      x = nn.relu(nn.Dense(200, name=f"fc{i + 1}")(x))
      self.sow("intermediates", f"fc{i + 1}_act", x)
    logits = _classifier(self.head, self.num_classes, "fc3")(x)
    self.sow("intermediates", "logits", logits)
    return logits


class _ConvBN(nn.Module):
  """Convolution, BatchNorm, ReLU."""

  features: int
  kernel: int = 3
  strides: int = 1
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                padding=self.padding, use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.relu(x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool_tiled(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """`nn.max_pool(x, (size, size), strides=(size, size))` over NHWC `x`, non-overlapping
  windows, with the same derivative computed in a form that XLA:CPU runs fast.

  The forward pass is the same window max (so pixel-local evaluation, which reads the
  model's jaxpr, still sees a pool). The derivative is not XLA's select-and-scatter, which
  XLA:CPU runs far slower than the convolutions around it and which every gradient attack
  and adversarial training step pays for, but elementwise masks, a reshape and a sum, in
  forward and in reverse mode. It goes to the first maximum of each window in row-major
  order, as select-and-scatter's and PyTorch's do: a window of tied maxima (a constant
  background after a ReLU) sends its derivative to the same input in all three.
  """
  return nn.max_pool(x, (size, size), strides=(size, size))


def _tiles(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B,H,W,C] -> [B,H/size,size,W/size,size,C], rows and columns that fill no window cut."""
  b, h, w, c = x.shape
  h, w = h // size * size, w // size * size
  return x[:, :h, :w].reshape(b, h // size, size, w // size, size, c)


def _first_maximum(x: jnp.ndarray, y: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B,H/size,size,W/size,size,C]: 1 at each window's first maximum (row-major), else 0."""
  hit = (_tiles(x, size) == y[:, :, None, :, None, :]).astype(jnp.int32)
  per_row = hit.sum(axis=4, keepdims=True)
  before = (jnp.cumsum(per_row, axis=2) - per_row) + (jnp.cumsum(hit, axis=4) - hit)
  return (hit * (before == 0)).astype(x.dtype)


@max_pool_tiled.defjvp
def _max_pool_tiled_jvp(size, primals, tangents):
  (x,), (dx,) = primals, tangents
  y = max_pool_tiled(x, size)
  return y, (_first_maximum(x, y, size) * _tiles(dx, size)).sum(axis=(2, 4))


def _conv_stack(module: nn.Module, x: jnp.ndarray, layers, train: bool) -> jnp.ndarray:
  """Runs `(name, features, kernel, strides, padding)` layers (or "pool:max"/"pool:avg")."""
  for spec in layers:
    if spec == "pool:max":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      continue
    if spec == "pool:max2":
      x = max_pool_tiled(x, 2)
      continue
    if spec == "pool:avg":
      x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      continue
    name, features, kernel, strides, padding = spec
    x = _ConvBN(features, kernel, strides, padding, name=name)(x, train)
    module.sow("intermediates", f"{name}_act", x)
  return x


class AllConvC(nn.Module):
  """All-CNN-C (Springenberg et al., 2015) with BatchNorm; one of Su et al.'s targets.

  `width` scales every hidden layer (1.0 = 96/192 channels).

  References: Springenberg et al., Striving for Simplicity: The All Convolutional Net, 2015;
  Su, Vargas, Sakurai, One Pixel Attack for Fooling Deep Neural Networks, 2019.
  """

  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD

  def layers(self) -> list:
    """The `_conv_stack` spec before the classifier."""
    a, b = _scaled(96, self.width), _scaled(192, self.width)
    return [
        ("conv1", a, 3, 1, "SAME"), ("conv2", a, 3, 1, "SAME"), ("conv3", a, 3, 2, "SAME"),
        ("conv4", b, 3, 1, "SAME"), ("conv5", b, 3, 1, "SAME"), ("conv6", b, 3, 2, "SAME"),
        ("conv7", b, 3, 1, "VALID"), ("conv8", b, 1, 1, "VALID"),
    ]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = _conv_stack(self, _normalize(x, self.mean, self.std), self.layers(), train)
    x = nn.Conv(self.num_classes, (1, 1), name="conv9")(x)
    logits = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "logits", logits)
    return logits


class NiN(nn.Module):
  """Network in Network (Lin et al., 2014) with BatchNorm; one of Su et al.'s targets.

  `width` scales every hidden layer (1.0 = 192/160/96 channels).

  References: Lin, Chen, Yan, Network In Network, ICLR 2014.
  """

  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD

  def layers(self) -> list:
    """The `_conv_stack` spec before the classifier."""
    s = lambda c: _scaled(c, self.width)  # noqa: E731
    return [
        ("block1_conv", s(192), 5, 1, "SAME"), ("block1_mlp1", s(160), 1, 1, "SAME"),
        ("block1_mlp2", s(96), 1, 1, "SAME"), "pool:max",
        ("block2_conv", s(192), 5, 1, "SAME"), ("block2_mlp1", s(192), 1, 1, "SAME"),
        ("block2_mlp2", s(192), 1, 1, "SAME"), "pool:avg",
        ("block3_conv", s(192), 3, 1, "SAME"), ("block3_mlp1", s(192), 1, 1, "SAME"),
    ]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = _conv_stack(self, _normalize(x, self.mean, self.std), self.layers(), train)
    x = nn.Conv(self.num_classes, (1, 1), name="block3_mlp2")(x)
    logits = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "logits", logits)
    return logits


class VGG16(nn.Module):
  """VGG-16 (Simonyan and Zisserman, 2015) for 32x32 inputs, with BatchNorm.

  `width` scales every convolution (1.0 = 64..512 channels).

  References: Simonyan, Zisserman, Very Deep Convolutional Networks, ICLR 2015.
  """

  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD

  def layers(self) -> list:
    """The `_conv_stack` spec before the classifier."""
    layers = []
    for stage, (channels, repeats) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3),
                                                 (512, 3)]):
      for j in range(repeats):
        layers.append((f"conv{stage + 1}_{j + 1}", _scaled(channels, self.width), 3, 1, "SAME"))
      layers.append("pool:max2")
    return layers

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = _conv_stack(self, _normalize(x, self.mean, self.std), self.layers(), train)
    x = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes, name="fc")(x)
    self.sow("intermediates", "logits", logits)
    return logits


class _ResidualBlock(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = _ConvBN(self.features, 3, self.strides, name="convbn1")(x, train)
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                  name="shortcut_conv")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="shortcut_bn")(x)
    return nn.relu(x + y)


class NonLocalDenoise(nn.Module):
  """Xie et al.'s feature denoising block: non-local means, a 1x1 convolution, a residual.

  Each position's features become the average of every position's features weighted by the
  softmax of their dot products (the "Gaussian" non-local means of the paper, without
  embeddings), scaled by 1/sqrt(C); a 1x1 convolution, initialised to zero so the block
  starts as the identity, maps the result back, and the input is added.

  References: Xie, Wu, van der Maaten, Yuille, He, Feature Denoising for Improving
  Adversarial Robustness, CVPR 2019, Sec. 4.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    affinity = jax.nn.softmax(jnp.einsum("bic,bjc->bij", flat, flat) / jnp.sqrt(c), -1)
    denoised = jnp.einsum("bij,bjc->bic", affinity, flat).reshape(b, h, w, c)
    return x + nn.Conv(c, (1, 1), use_bias=False, kernel_init=nn.initializers.zeros,
                       name="conv")(denoised)


class ResNet20(nn.Module):
  """ResNet-20 for CIFAR-10 (He et al., 2016): 3 stages of 3 basic blocks, 16/32/64 channels.

  Projection (1x1 conv) shortcuts where the shape changes. `width` scales the channels.
  `denoise_after` lists the stages (1-3) followed by a `NonLocalDenoise` block (Xie et al.
  put one after each of their ResNet's stages); `head` as in `PapernotLeNet`.

  References: He, Zhang, Ren, Sun, Deep Residual Learning for Image Recognition, CVPR 2016.
  """

  num_classes: int = 10
  width: float = 1.0
  blocks_per_stage: int = 3
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  denoise_after: Sequence[int] = ()
  head: str = SOFTMAX

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = _normalize(x, self.mean, self.std)
    x = _ConvBN(_scaled(16, self.width), name="stem")(x, train)
    self.sow("intermediates", "stem_act", x)
    for stage, channels in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        name = f"stage{stage + 1}_block{block + 1}"
        x = _ResidualBlock(_scaled(channels, self.width), strides, name=name)(x, train)
        self.sow("intermediates", f"{name}_act", x)
      if stage + 1 in self.denoise_after:
        x = NonLocalDenoise(name=f"stage{stage + 1}_denoise")(x)
        self.sow("intermediates", f"stage{stage + 1}_denoise_act", x)
    x = jnp.mean(x, axis=(1, 2))
    logits = _classifier(self.head, self.num_classes, "fc")(x)
    self.sow("intermediates", "logits", logits)
    return logits
