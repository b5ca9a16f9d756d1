"""Strong and weak gradients (paper §2.4): who gets the credit for each step.

With g the gradient of the loss summed over all training examples and g^p, g^c
the sums over the pristine and the corrupt ones,
  f^p = <g, g^p> / <g, g>,  f^c = <g, g^c> / <g, g>  (f^p + f^c = 1),
  i^p_t = (1/|p|) sum_{t' <= t} <g_t', g^p_t'>,  likewise i^c_t.
Null worlds: the same with the pristine/corrupt designation permuted.

Everything follows from one vector, the alignment s_e = <g, g_e> of each
example's gradient with the total: <g, g^p> = sum_{e in p} s_e and <g, g> =
sum_e s_e. For a Dense layer z = a W + b, <G_W, outer(a_e, delta_e)> =
a_e^T G_W delta_e, so s costs one forward-and-backward pass after g is known,
exactly, over all examples and parameters, and any number of null worlds are
free. The paper's estimator (a sample of 400 examples and 300 weights per
layer) is the same formula restricted to the sample. Other layers (a
convolution's, say) give s_e by their rules in gradients.py.
"""

import time
from typing import Dict, List, Sequence

import keras
import numpy as np
import tensorflow as tf

from cg_tf import gradients


@tf.function
def _total_gradient_chunk(model: keras.Model, images, labels) -> List[tf.Tensor]:
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(gradients.per_example_loss(labels, model(images)))
  return tape.gradient(loss, model.trainable_variables)


def total_gradient(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                   chunk: int) -> List[tf.Tensor]:
  """Gradient of the loss summed over all examples, one tensor per variable.

  Args:
    model: the network.
    images: [n, inputs]; labels: [n] int.
    chunk: examples per pass.

  Returns:
    [*variable.shape] per model.trainable_variables.
  """
  total = None
  for start in range(0, len(labels), chunk):
    part = _total_gradient_chunk(model, images[start:start + chunk], labels[start:start + chunk])
    total = part if total is None else [t + p for t, p in zip(total, part)]
  return total


def per_example_gradients(model: keras.Model, images, labels) -> gradients.PerExampleGradients:
  """Every example's gradient of its own softmax cross-entropy, by the per-layer rules.

  Args:
    model: the network; images: [m, inputs]; labels: [m] int.
  """
  with tf.GradientTape() as tape:
    with gradients.recording(model) as record:
      logits = model(images)
    loss = tf.reduce_sum(gradients.per_example_loss(labels, logits))
  return record.gradients(tape, loss)


@tf.function
def _alignment_chunk(model: keras.Model, images, labels, total: Sequence[tf.Tensor]):
  return per_example_gradients(model, images, labels).alignment(total)


def alignment(model: keras.Model, images: np.ndarray, labels: np.ndarray,
              total: Sequence[tf.Tensor], chunk: int) -> np.ndarray:
  """s_e = <total, g_e> for every example e, g_e the gradient of its own loss.

  Args:
    model: the network (any layers gradients.py has rules for).
    images: [n, inputs]; labels: [n] int.
    total: one tensor per trainable variable, e.g. from total_gradient.
    chunk: examples per pass.

  Returns:
    float64 [n].
  """
  parts = [_alignment_chunk(model, images[s:s + chunk], labels[s:s + chunk], list(total))
           for s in range(0, len(labels), chunk)]
  return np.concatenate([p.numpy() for p in parts]).astype(np.float64)


def weighted_layers(model: keras.Model) -> list:
  """[(layer, its first own variable)] of the layers with weights of their own, in order: the
  variable is the kernel the paper's estimator samples from (a Dense or convolution kernel)."""
  return [(layer, gradients.own_trainable_variables(layer)[0])
          for layer in gradients.layers_with_weights(model)]


def sample_weights(model: keras.Model, per_layer: int, seed: int) -> List[np.ndarray]:
  """The paper's weight sample: `per_layer` flat kernel indices from each layer with weights."""
  rng = np.random.default_rng([seed, 3])
  return [np.sort(rng.choice(int(np.prod(kernel.shape)),
                             min(per_layer, int(np.prod(kernel.shape))), replace=False))
          for _, kernel in weighted_layers(model)]


def sampled_alignment(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                      weights: Sequence[np.ndarray]) -> np.ndarray:
  """The paper's estimator: s_e restricted to a sample of examples and kernel weights.

  Args:
    model: the network.
    images: [m, inputs]; labels: [m]: the sampled examples.
    weights: per layer with weights, flat indices into its kernel (sample_weights).

  Returns:
    float64 [m]: <g_S, g_e> over the sampled weights, g_S = sum of the sample's
    per-example gradients there.
  """
  per_example = per_example_gradients(model, tf.constant(images), tf.constant(labels))
  columns = [per_example.variable(kernel).at(tf.constant(flat))
             for (_, kernel), flat in zip(weighted_layers(model), weights)]
  per_example_values = tf.concat(columns, axis=1).numpy().astype(np.float64)  # [m, weights]
  return per_example_values @ per_example_values.sum(axis=0)


def null_designations(corrupt: np.ndarray, num_worlds: int, seed: int) -> np.ndarray:
  """bool [num_worlds, n]: the corrupt mask randomly permuted, group sizes kept."""
  rng = np.random.default_rng([seed, 2])
  return np.stack([rng.permutation(corrupt) for _ in range(num_worlds)]) if num_worlds else \
      np.zeros((0, len(corrupt)), bool)


def group_inner_products(alignment_values: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
  """[..., 2]: (<g, g^p>, <g, g^c>) for each designation in `corrupt` [..., n]."""
  in_corrupt = (alignment_values * corrupt).sum(axis=-1)
  return np.stack([(alignment_values * ~corrupt).sum(axis=-1), in_corrupt], axis=-1)


def fractions(inner: np.ndarray) -> np.ndarray:
  """[..., 2] (f^p, f^c) from [..., 2] (<g, g^p>, <g, g^c>); each row sums to 1."""
  return inner / inner.sum(axis=-1, keepdims=True)


def cumulative_means(inner: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
  """(i^p_t, i^c_t): cumulative sums over steps [T, ..., 2] divided by (|p|, |c|).

  Args:
    inner: [T, ..., 2] per-step (<g, g^p>, <g, g^c>), consecutive steps from 0.
    corrupt: [..., n] designations matching inner's middle axes.

  Returns:
    [T, ..., 2]; a group with no examples gives NaN.
  """
  sizes = np.stack([(~corrupt).sum(axis=-1), corrupt.sum(axis=-1)], axis=-1).astype(np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.cumsum(inner, axis=0) / sizes


class Recorder:
  """Measures the decomposition at chosen steps of a run and keeps the records.

  Records (decomposition.npz in the run directory): `step` [T]; `inner` [T,
  1 + K, 2], the full-population (<g, g^p>, <g, g^c>) of the actual designation
  (index 0) and the K null worlds; `sampled_inner` [T, 1 + K, 2], the paper's
  estimator for the same designations; `corrupt` [1 + K, n]; `seconds` [T].
  """

  def __init__(self, model, images, labels, corrupt, null_worlds: int, seed: int,
               chunk: int, sample_examples: int, sample_weights_per_layer: int):
    self.model, self.images, self.labels, self.chunk = model, images, labels, chunk
    self.designations = np.concatenate([corrupt[None], null_designations(corrupt, null_worlds,
                                                                         seed)])
    rng = np.random.default_rng([seed, 4])
    self.sample = np.sort(rng.choice(len(labels), min(sample_examples, len(labels)),
                                     replace=False))
    self.weights = sample_weights(model, sample_weights_per_layer, seed)
    self.records: Dict[str, list] = {'step': [], 'inner': [], 'sampled_inner': [],
                                     'seconds': []}

  def restore(self, saved: Dict[str, np.ndarray], up_to_step: int) -> None:
    """Keeps the saved records of steps <= up_to_step (a resumed run redoes the rest)."""
    keep = saved['step'] <= up_to_step
    self.records = {k: list(saved[k][keep]) for k in self.records}

  def measure(self, step: int) -> None:
    """Measures at the model's current parameters and appends to the records."""
    start = time.perf_counter()
    total = total_gradient(self.model, self.images, self.labels, self.chunk)
    inner = group_inner_products(
        alignment(self.model, self.images, self.labels, total, self.chunk), self.designations)
    sampled = group_inner_products(
        sampled_alignment(self.model, self.images[self.sample], self.labels[self.sample],
                          self.weights), self.designations[:, self.sample])
    for key, value in (('step', step), ('inner', inner), ('sampled_inner', sampled),
                       ('seconds', time.perf_counter() - start)):
      self.records[key].append(value)

  def arrays(self) -> Dict[str, np.ndarray]:
    arrays = {k: np.asarray(v) for k, v in self.records.items()}
    arrays['corrupt'] = self.designations
    return arrays

  def scalars(self) -> Dict[str, float]:
    """Summaries of the latest record: f and, while steps are consecutive from 0, i."""
    arrays = self.arrays()
    f, f_sampled = fractions(arrays['inner'][-1]), fractions(arrays['sampled_inner'][-1])
    out = {'decomposition/seconds': float(arrays['seconds'][-1])}
    consecutive = np.array_equal(arrays['step'], np.arange(len(arrays['step'])))
    i = cumulative_means(arrays['inner'], self.designations)[-1] if consecutive else None
    for world in range(len(self.designations)):
      prefix = 'decomposition' if world == 0 else f'decomposition_null{world}'
      out[f'{prefix}/f_pristine'] = float(f[world, 0])
      out[f'{prefix}/f_corrupt'] = float(f[world, 1])
      out[f'{prefix}/f_pristine_sampled'] = float(f_sampled[world, 0])
      if i is not None:
        out[f'{prefix}/i_pristine'] = float(i[world, 0])
        out[f'{prefix}/i_corrupt'] = float(i[world, 1])
    return out

  def image_summaries(self) -> Dict[str, np.ndarray]:
    """The decomposition has no image summaries."""
    return {}
