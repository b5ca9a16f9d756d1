"""The networks: the paper's fully connected ReLU network, and a small convolutional one."""

import math
from typing import Sequence

import keras


def kernel_initializer(init: str, fan_in: int, fan_out: int, seed: int):
  """The initializer of one Dense kernel.

  'paper' is what the authors' released code draws (google-research,
  coherent_gradients/iclr_2020_paper/utils.py): W ~ N(0, 1) * 2 / sqrt(fan_in +
  fan_out), untruncated, i.e. sqrt(2) times the Glorot-normal spread. The paper
  itself only says "Xavier".
  """
  if init == 'paper':
    return keras.initializers.RandomNormal(stddev=2.0 / math.sqrt(fan_in + fan_out), seed=seed)
  if init == 'glorot_uniform':
    return keras.initializers.GlorotUniform(seed=seed)
  raise ValueError(f'unknown init {init!r}')


def build_mlp(num_inputs: int, hidden: Sequence[int], num_classes: int, init: str,
              seed: int) -> keras.Sequential:
  """An MLP: ReLU hidden layers of widths `hidden`, then linear logits.

  Biases start at zero and are trained. Layer i's kernel is drawn with seed
  `seed * 1000 + i`, so the initialisation depends on `seed` alone.

  Args:
    num_inputs: input size (784 for MNIST).
    hidden: hidden layer widths, e.g. (2048,) or (256, 256, 256).
    num_classes: number of logits.
    init: 'paper' or 'glorot_uniform'.
    seed: initialisation seed.

  Returns:
    A built keras.Sequential of Dense layers mapping [batch, num_inputs] to
    [batch, num_classes] logits.
  """
  widths = [num_inputs, *hidden, num_classes]
  layers = [keras.Input((num_inputs,))]
  for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
    last = i == len(widths) - 2
    layers.append(keras.layers.Dense(
        fan_out, activation=None if last else 'relu',
        kernel_initializer=kernel_initializer(init, fan_in, fan_out, seed * 1000 + i),
        bias_initializer='zeros', name='logits' if last else f'hidden_{i + 1}'))
  return keras.Sequential(layers, name='mlp')


def _conv_fans(kernel_size: Sequence[int], channels_in: int, channels_out: int):
  """Keras' (and Glorot's) fans of a convolution kernel: the receptive field times the channels."""
  field = math.prod(kernel_size)
  return field * channels_in, field * channels_out


def build_cnn(image_shape: Sequence[int], num_classes: int, init: str, seed: int) -> keras.Sequential:
  """The convolutional network of the authors' follow-up on MNIST-sized images.

  Conv2D 32 3x3 -> max-pool 2 -> Conv2D 64 3x3 -> max-pool 2 -> Dense 128 ->
  Dense num_classes, ReLU after every layer but the last, 'valid' padding. It
  takes flat images (as the MLP does) and reshapes them. 'paper' draws each
  kernel from N(0, 1) * 2 / sqrt(fan_in + fan_out) with Keras' fans (for a
  convolution, the receptive field times the channels); biases start at zero.
  Layer i's kernel is drawn with seed `seed * 1000 + i`.

  Args:
    image_shape: (height, width, channels), e.g. (28, 28, 1).
    num_classes: number of logits.
    init: 'paper' or 'glorot_uniform'.
    seed: initialisation seed.

  Returns:
    A built keras.Sequential mapping [batch, height * width * channels] to
    [batch, num_classes] logits.
  """
  height, width, channels = image_shape
  layers = [keras.Input((height * width * channels,)),
            keras.layers.Reshape((height, width, channels), name='image')]
  for i, filters in enumerate((32, 64)):
    fan_in, fan_out = _conv_fans((3, 3), channels, filters)
    layers += [keras.layers.Conv2D(filters, 3, activation='relu', name=f'conv_{i + 1}',
                                   kernel_initializer=kernel_initializer(init, fan_in, fan_out,
                                                                         seed * 1000 + i)),
               keras.layers.MaxPooling2D(2, name=f'pool_{i + 1}')]
    channels = filters
  layers.append(keras.layers.Flatten(name='flatten'))
  flat = ((height - 2) // 2 - 2) // 2 * (((width - 2) // 2 - 2) // 2) * channels
  layers += [keras.layers.Dense(128, activation='relu', name='hidden_1',
                                kernel_initializer=kernel_initializer(init, flat, 128,
                                                                      seed * 1000 + 2)),
             keras.layers.Dense(num_classes, name='logits',
                                kernel_initializer=kernel_initializer(init, 128, num_classes,
                                                                      seed * 1000 + 3))]
  return keras.Sequential(layers, name='cnn')


def build(model: str, num_inputs: int, hidden: Sequence[int], num_classes: int, init: str,
          seed: int) -> keras.Sequential:
  """The network `model` names: 'mlp' (build_mlp with `hidden`) or 'cnn' (build_cnn, on
  square one-channel images of num_inputs pixels)."""
  if model == 'mlp':
    return build_mlp(num_inputs, hidden, num_classes, init, seed)
  side = math.isqrt(num_inputs)
  if side * side != num_inputs:
    raise ValueError(f'the cnn takes square one-channel images; {num_inputs} pixels are not')
  return build_cnn((side, side, 1), num_classes, init, seed)
