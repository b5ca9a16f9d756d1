"""The paper's fully connected ReLU network as a Keras model."""

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
