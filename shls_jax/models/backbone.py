"""The ResNet-18-like backbone of SHLS, trained from scratch (SPEC 3.1).

    stem    conv 7x7 s2 pad 3, BN, ReLU                64 ch   stride 2
    layer1  2 basic blocks                             64 ch   stride 2 -> f2
    layer2  basic block s2 (1x1 shortcut) + block     128 ch   stride 4
    layer3  basic block (1x1 shortcut) + block        256 ch   stride 4
    layer4  2 basic blocks                            256 ch   stride 4 -> f4

There is no max-pool. Every convolution pads symmetrically by
(kernel - 1) // 2, as PyTorch does: Flax's 'SAME' pads a stride-2 convolution
of an even-sized input by (0, 1) instead of (1, 1) and so gives different
numbers from the authors' weights.

Submodule names follow the authors' PyTorch names with every `nn.Sequential`
index joined by an underscore (`conv1.0` -> `conv1_0`, `layer2.0.left.3` ->
`layer2_0/left_3`); superfeatures.py has the full table.

Weights are initialised like PyTorch's defaults (uniform, bound
1 / sqrt(fan_in)), since the authors train from scratch with them.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's default for conv and linear weights: kaiming_uniform(a=sqrt(5)),
# i.e. U(-b, b) with b = 1 / sqrt(fan_in).
torch_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init, U(-b, b) with b = 1 / sqrt(fan_in)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normalize(
    frames: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """Scales uint8 RGB to [0, 1], then normalises per channel.

  Args:
    frames: uint8 [..., height, width, 3].
    mean: 3 channel means of the [0, 1] images (the config's).
    std: 3 channel standard deviations.

  Returns:
    float32 [..., height, width, 3].
  """
  frames = jnp.asarray(frames, jnp.float32) / 255.0
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (frames - mean) / std


def conv(features: int, kernel: int, strides: int = 1, *, name: str) -> nn.Conv:
  """A bias-free convolution with PyTorch's symmetric padding."""
  pad = (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=torch_kernel_init,
      name=name,
  )


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

  The shortcut is a strided 1x1 conv + BN when the stride or the channel count
  changes (the authors' rule), the identity otherwise.

  Attributes:
    features: output channels.
    strides: stride of the first 3x3 conv and of the shortcut.
    bn_momentum: Flax convention (PyTorch's 0.1 is 0.9 here).
    bn_epsilon: BatchNorm epsilon.
    axis_name: if set, BatchNorm statistics are averaged over this axis.
  """

  features: int
  strides: int = 1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(
      self, x: jax.Array, *, train: bool, mask: jax.Array | None = None
  ) -> jax.Array:
    """[batch, height, width, c] -> [batch, height/s, width/s, features].

    `mask` (bool [batch]) limits the training-mode BatchNorm statistics to
    the rows it marks (padding rows are normalised but never counted).
    """
    bn_mask = None if mask is None else mask[:, None, None, None]

    def bn(name):
      module = nn.BatchNorm(
          use_running_average=not train,
          momentum=self.bn_momentum,
          epsilon=self.bn_epsilon,
          axis_name=self.axis_name,
          name=name,
      )
      return lambda y: module(y, mask=bn_mask)

    y = conv(self.features, 3, self.strides, name="left_0")(x)
    y = nn.relu(bn("left_1")(y))
    y = conv(self.features, 3, name="left_3")(y)
    y = bn("left_4")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, name="shortcut_0")(x)
      x = bn("shortcut_1")(x)
    return nn.relu(y + x)


class Backbone(nn.Module):
  """The ResNet-18-like feature extractor (`feat_extractor` in the checkpoint).

  Attributes:
    stem_features: channels of the 7x7 stem.
    stem_kernel: stem kernel size.
    stem_strides: stem stride.
    stage_features: channels of layer1..layer4.
    stage_blocks: basic blocks per stage.
    stage_strides: stride of the first block of each stage.
    bn_momentum: Flax convention (PyTorch's 0.1 is 0.9 here).
    bn_epsilon: BatchNorm epsilon.
    axis_name: if set, BatchNorm statistics are averaged over this axis (the
      authors' DataParallel normalises each replica on its own: None).
  """

  stem_features: int = 64
  stem_kernel: int = 7
  stem_strides: int = 2
  stage_features: Sequence[int] = (64, 128, 256, 256)
  stage_blocks: Sequence[int] = (2, 2, 2, 2)
  stage_strides: Sequence[int] = (1, 2, 1, 1)
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @property
  def strides(self) -> tuple[int, int]:
    """Total strides of (f2, f4): after layer1 and after the last stage."""
    first = self.stem_strides * self.stage_strides[0]
    return first, int(np.prod(self.stage_strides)) * self.stem_strides

  @nn.compact
  def __call__(
      self, frames: jax.Array, *, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Computes the two feature maps.

    Args:
      frames: float32 [batch, height, width, 3], already normalised.
      train: batch statistics (and their running update) if True, running
        statistics otherwise.

    Returns:
      f2: [batch, height/2, width/2, stage_features[0]], layer1's output.
      f4: [batch, ceil(height/4), ceil(width/4), stage_features[-1]], the
        last stage's.
    """
    x = conv(
        self.stem_features, self.stem_kernel, self.stem_strides, name="conv1_0"
    )(frames)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        axis_name=self.axis_name,
        name="conv1_1",
    )(x)
    x = nn.relu(x)
    f2 = None
    for stage, (features, blocks, strides) in enumerate(
        zip(self.stage_features, self.stage_blocks, self.stage_strides)
    ):
      for block in range(blocks):
        x = BasicBlock(
            features,
            strides if block == 0 else 1,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            axis_name=self.axis_name,
            name=f"layer{stage + 1}_{block}",
        )(x, train=train)
      if stage == 0:
        f2 = x
    return f2, x
