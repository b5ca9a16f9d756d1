"""Coherence of per-example gradients, measured directly over the whole training set.

g_e is the gradient of example e's own loss over all parameters. The measures:
- m-coherence of a set S: ||sum_{e in S} g_e||^2 / sum_{e in S} ||g_e||^2, 1 for
  orthogonal gradients and |S| for identical ones (Chatterjee & Zielinski 2020,
  2022; its inverse is Yin et al.'s gradient diversity);
- per-example coherence c_e = <g_e, g> / ||g_e||^2 with g = sum_f g_f: how many
  examples a step on e helps (1 + sum_{f != e} <g_e, g_f> / ||g_e||^2);
- GSNR of parameter j over the training set, (E g_j)^2 / Var g_j (Liu et al.
  2020), and the share of examples agreeing with the majority sign of g_j;
- stiffness: the cosine between two examples' gradients (Fort et al. 2019),
  averaged over the pairs of each two classes;
- forgetting events: an example classified correctly at its previous
  presentation in a minibatch and wrongly at this one (Toneva et al. 2019).

Why it is exact at the cost of about one pass (gradients.py has the rule of
each layer type; a Dense layer's is the cheapest): for a Dense layer z = a W + b
with error delta_e = d loss_e / d z_e, g_e on the layer is (outer(a_e,
delta_e), delta_e), so
  ||g_e||^2 = (||a_e||^2 + 1) ||delta_e||^2,
  <g_e, g_f> = (<a_e, a_f> + 1) <delta_e, delta_f>,
  sum_e g_e = (A^T Delta, sum_e delta_e),  sum_e g_e^2 = ((A o A)^T (Delta o Delta), ...),
and the sign of g_e's kernel entry (i, j) is sign(a_ei) sign(delta_ej), so the
sign counts are sign(A)^T sign(Delta). No per-example gradient is ever formed.
"""

import dataclasses
import time
from typing import Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from cg_tf import decomposition
from cg_tf import gradients

GROUPS = ('whole', 'pristine', 'corrupt')
# A parameter's per-example gradients "mostly agree in sign" when at least this
# share of the examples with a nonzero gradient there share the majority sign.
SIGN_MAJORITY = 0.75


@dataclasses.dataclass
class LayerSums:
  """Sums over the training examples for one layer's parameters.

  Attributes (float64 [parameters], the layer's variables flattened and
  concatenated in order):
    corrupt_sum: sum of g_e over the corrupt examples.
    total_sum: sum of g_e over all examples.
    square_sum: sum of g_e^2 (elementwise).
    sign_sum: sum of sign(g_e).
    nonzero: number of examples with g_e != 0.
    shapes: each variable's shape, to split the sums back into variables.
  """
  corrupt_sum: np.ndarray
  total_sum: np.ndarray
  square_sum: np.ndarray
  sign_sum: np.ndarray
  nonzero: np.ndarray
  shapes: tuple

  def variable_totals(self) -> List[np.ndarray]:
    """total_sum split into one array per variable, in the variable's shape."""
    sizes = [int(np.prod(shape)) for shape in self.shapes]
    pieces = np.split(self.total_sum, np.cumsum(sizes)[:-1])
    return [piece.reshape(shape) for piece, shape in zip(pieces, self.shapes)]


def _joined(parts: List[tf.Tensor]) -> tf.Tensor:
  """One layer's per-variable sums as one flat array."""
  return tf.concat([tf.reshape(p, [-1]) for p in parts], axis=0)


@tf.function
def _chunk_statistics(model: keras.Model, images, labels, corrupt):
  """Per layer: the LayerSums arrays of one chunk, and every example's ||g_e||^2 [chunk]."""
  per_example = decomposition.per_example_gradients(model, images, labels)
  weight = tf.cast(corrupt, tf.float32)
  sums = []
  for layer in per_example.layers:
    sums.append(tuple(_joined(layer.sums(kind, w)) for kind, w in (
        ('value', weight), ('value', None), ('square', None), ('sign', None),
        ('nonzero', None))))
  return sums, tf.stack([layer.squared_norms() for layer in per_example.layers], axis=1)


def layer_statistics(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                     corrupt: np.ndarray, chunk: int):
  """One pass over the examples: float32 matmuls per chunk, chunks summed in float64.

  The sign and nonzero counts are exact (integers below 2^24 in float32); the
  sums carry float32 rounding, 1e-6 relative, like every gradient in training.

  Args:
    model: the network (any layers gradients.py has rules for).
    images: [n, inputs]; labels: [n] int; corrupt: [n] bool.
    chunk: examples per pass.

  Returns:
    ([LayerSums per layer with weights], float64 [n, layers] ||g_e||^2 restricted to each layer).
  """
  totals, norms = None, []
  for start in range(0, len(labels), chunk):
    part, sq = _chunk_statistics(model, images[start:start + chunk],
                                 labels[start:start + chunk], corrupt[start:start + chunk])
    part = [[t.numpy().astype(np.float64) for t in layer] for layer in part]
    totals = part if totals is None else [[t + p for t, p in zip(tl, pl)]
                                          for tl, pl in zip(totals, part)]
    norms.append(sq.numpy().astype(np.float64))
  shapes = [tuple(tuple(v.shape) for v in gradients.own_trainable_variables(layer))
            for layer in gradients.layers_with_weights(model)]
  return [LayerSums(*layer, shapes=shape) for layer, shape in zip(totals, shapes)], \
      np.concatenate(norms)


def m_coherence(sum_sq_norm: np.ndarray, sq_norm_sum: np.ndarray) -> np.ndarray:
  """||sum g_e||^2 / sum ||g_e||^2, elementwise; NaN where the set is empty or all zero."""
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(sq_norm_sum > 0, sum_sq_norm / np.where(sq_norm_sum > 0, sq_norm_sum, 1),
                    np.nan)


def group_m_coherence(sums: List[LayerSums], sq_norms: np.ndarray,
                      corrupt: np.ndarray) -> np.ndarray:
  """[3, layers + 1]: m-coherence of (whole, pristine, corrupt), per layer and (last) overall."""
  pristine_sums = [s.total_sum - s.corrupt_sum for s in sums]
  numerators, denominators = [], []
  for group_sums, mask in ((
      [s.total_sum for s in sums], np.ones_like(corrupt)),
      (pristine_sums, ~corrupt), ([s.corrupt_sum for s in sums], corrupt)):
    per_layer = np.array([np.sum(g * g) for g in group_sums])
    numerators.append(np.append(per_layer, per_layer.sum()))
    per_layer_norms = sq_norms[mask].sum(axis=0)
    denominators.append(np.append(per_layer_norms, per_layer_norms.sum()))
  return m_coherence(np.array(numerators), np.array(denominators))


def gsnr(mean: np.ndarray, mean_square: np.ndarray) -> np.ndarray:
  """(E g)^2 / Var g per parameter; NaN where the gradient never varies (Var = 0)."""
  variance = np.maximum(mean_square - mean * mean, 0.0)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(variance > 0, mean * mean / np.where(variance > 0, variance, 1), np.nan)


def sign_majority(sign_sum: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
  """Share of the nonzero per-example gradients with the majority sign, in [0.5, 1]; NaN if none."""
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(nonzero > 0, 0.5 + 0.5 * np.abs(sign_sum) / np.where(nonzero > 0, nonzero, 1),
                    np.nan)


@tf.function
def _stiffness_kernel(model: keras.Model, images, labels):
  return decomposition.per_example_gradients(model, images, labels).gram()


def gradient_cosines(model: keras.Model, images: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
  """float64 [m, m] cosines between the examples' gradients; NaN for a zero gradient.

  Args:
    model: the network.
    images: [m, inputs]; labels: [m] int.
  """
  kernel = _stiffness_kernel(model, images, labels).numpy()
  norms = np.sqrt(np.diag(kernel))
  with np.errstate(divide='ignore', invalid='ignore'):
    return kernel / np.outer(norms, norms)


def class_stiffness(cosines: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes]: mean cosine over pairs e != f of classes (i, j); NaN if none.

  Args:
    cosines: [m, m] from gradient_cosines.
    classes: [m] int class of each example.
    num_classes: size of the matrix.
  """
  one_hot = (classes[:, None] == np.arange(num_classes)[None]).astype(np.float64)
  valid = ~np.isnan(cosines)
  np.fill_diagonal(valid, False)
  totals = one_hot.T @ np.where(valid, cosines, 0.0) @ one_hot
  counts = one_hot.T @ valid.astype(np.float64) @ one_hot
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(counts > 0, totals / np.where(counts > 0, counts, 1), np.nan)


def stiffness_image(matrix: np.ndarray, scale: int = 16) -> np.ndarray:
  """float32 [1, k*scale, k*scale, 3]: +1 red, 0 white, -1 blue, NaN grey, for tf.summary.image."""
  x = np.clip(np.nan_to_num(matrix, nan=0.0), -1, 1)
  rgb = np.stack([1 - np.maximum(-x, 0), 1 - np.abs(x), 1 - np.maximum(x, 0)], axis=-1)
  rgb[np.isnan(matrix)] = 0.5
  return np.kron(rgb, np.ones((scale, scale, 1)))[None].astype(np.float32)


def count_forgetting(last_correct: tf.Tensor, correct: tf.Tensor):
  """One presentation's update of the forgetting record.

  Args:
    last_correct: int8 [B]: 1 if the example was classified correctly at its
      previous presentation, 0 if not, -1 if it was never presented.
    correct: bool [B]: classified correctly now.

  Returns:
    (int8 [B] the new last_correct, int32 [B] 1 where this is a forgetting event).
  """
  forgotten = tf.logical_and(tf.equal(last_correct, 1), tf.logical_not(correct))
  return tf.cast(correct, tf.int8), tf.cast(forgotten, tf.int32)


class Recorder:
  """Measures coherence at chosen steps of a run and keeps the records.

  Records (coherence.npz in the run directory), T measurements, L layers:
  `step` [T]; `m_coherence` [T, 3, L + 1] for (whole, pristine, corrupt), per
  layer and (last) over all parameters; `example_coherence_mean` [T, 3], the
  mean c_e of each group; `gsnr_mean`, `gsnr_median`, `sign_agreeing` [T, L]
  over each layer's parameters whose gradient varies (sign_agreeing: the share
  of parameters where at least SIGN_MAJORITY of the nonzero per-example
  gradients have the majority sign); `seconds` [T]; with stiffness,
  `stiffness` [T, 10, 10] (classes of the training labels), `stiffness_sample`
  [m] and `stiffness_seconds` [T]. `example_coherence` [n]: c_e at
  `example_coherence_step`, the first measurement; `corrupt` [n].
  """

  def __init__(self, model, images, labels, corrupt, chunk: int, stiffness_examples: int,
               seed: int, num_classes: int):
    self.model, self.images, self.labels, self.corrupt = model, images, labels, corrupt
    self.chunk, self.num_classes = chunk, num_classes
    self.stiffness_sample = None
    if stiffness_examples:
      rng = np.random.default_rng([seed, 5])
      self.stiffness_sample = np.sort(rng.choice(len(labels), min(stiffness_examples,
                                                                  len(labels)), replace=False))
    keys = ['step', 'm_coherence', 'example_coherence_mean', 'gsnr_mean', 'gsnr_median',
            'sign_agreeing', 'seconds']
    if stiffness_examples:
      keys += ['stiffness', 'stiffness_seconds']
    self.records: Dict[str, list] = {k: [] for k in keys}
    self.example_coherence: Optional[np.ndarray] = None
    self.example_coherence_step = -1

  def restore(self, saved: Dict[str, np.ndarray], up_to_step: int) -> None:
    """Keeps the saved records of steps <= up_to_step (a resumed run redoes the rest)."""
    keep = saved['step'] <= up_to_step
    self.records = {k: list(saved[k][keep]) for k in self.records}
    if 0 <= saved['example_coherence_step'] <= up_to_step:
      self.example_coherence = saved['example_coherence']
      self.example_coherence_step = int(saved['example_coherence_step'])

  def measure(self, step: int) -> None:
    """Measures at the model's current parameters and appends to the records."""
    start = time.perf_counter()
    sums, sq_norms = layer_statistics(self.model, self.images, self.labels, self.corrupt,
                                      self.chunk)
    total = [tf.constant(piece, tf.float32) for s in sums for piece in s.variable_totals()]
    alignment = decomposition.alignment(self.model, self.images, self.labels, total, self.chunk)
    with np.errstate(divide='ignore', invalid='ignore'):
      example_coherence = alignment / sq_norms.sum(axis=1)
    if self.example_coherence is None:
      self.example_coherence, self.example_coherence_step = example_coherence, step
    n = len(self.labels)
    ratios = [gsnr(s.total_sum / n, s.square_sum / n) for s in sums]
    majority = [sign_majority(s.sign_sum, s.nonzero) for s in sums]
    values = {
        'step': step,
        'm_coherence': group_m_coherence(sums, sq_norms, self.corrupt),
        'example_coherence_mean': np.array([_mean(example_coherence[mask]) for mask in (
            np.ones_like(self.corrupt), ~self.corrupt, self.corrupt)]),
        'gsnr_mean': np.array([_mean(r[~np.isnan(r)]) for r in ratios]),
        'gsnr_median': np.array([np.median(r[~np.isnan(r)]) if (~np.isnan(r)).any() else np.nan
                                 for r in ratios]),
        'sign_agreeing': np.array([_mean(m[~np.isnan(r)] >= SIGN_MAJORITY)
                                   for m, r in zip(majority, ratios)]),
        'seconds': time.perf_counter() - start}
    if self.stiffness_sample is not None:
      start = time.perf_counter()
      sample = self.stiffness_sample
      values['stiffness'] = class_stiffness(
          gradient_cosines(self.model, self.images[sample], self.labels[sample]),
          self.labels[sample], self.num_classes)
      values['stiffness_seconds'] = time.perf_counter() - start
    for key, value in values.items():
      self.records[key].append(value)

  def arrays(self) -> Dict[str, np.ndarray]:
    arrays = {k: np.asarray(v) for k, v in self.records.items()}
    arrays.update(corrupt=self.corrupt, example_coherence=self.example_coherence,
                  example_coherence_step=np.asarray(self.example_coherence_step))
    if self.stiffness_sample is not None:
      arrays['stiffness_sample'] = self.stiffness_sample
    return arrays

  def scalars(self) -> Dict[str, float]:
    """TensorBoard scalars of the latest record (NaN ones, e.g. an empty group, left out)."""
    latest = {k: v[-1] for k, v in self.records.items()}
    out = {'coherence/seconds': float(latest['seconds'])}
    for g, group in enumerate(GROUPS):
      suffix = '' if group == 'whole' else f'_{group}'
      out[f'coherence/m_coherence{suffix}'] = latest['m_coherence'][g, -1]
      out[f'coherence/example_coherence_mean{suffix}'] = latest['example_coherence_mean'][g]
    for layer in range(len(latest['gsnr_mean'])):
      out[f'coherence/layer{layer + 1}/m_coherence'] = latest['m_coherence'][0, layer]
      out[f'gsnr/layer{layer + 1}/mean'] = latest['gsnr_mean'][layer]
      out[f'gsnr/layer{layer + 1}/median'] = latest['gsnr_median'][layer]
      out[f'gsnr/layer{layer + 1}/sign_agreeing'] = latest['sign_agreeing'][layer]
    if 'stiffness' in latest:
      matrix = latest['stiffness']
      out['stiffness/same_class'] = _mean(np.diag(matrix))
      out['stiffness/other_class'] = _mean(matrix[~np.eye(len(matrix), dtype=bool)])
      out['stiffness/seconds'] = float(latest['stiffness_seconds'])
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}

  def image_summaries(self) -> Dict[str, np.ndarray]:
    """TensorBoard images of the latest record: the class stiffness matrix."""
    if 'stiffness' not in self.records:
      return {}
    return {'stiffness/class_matrix': stiffness_image(self.records['stiffness'][-1])}


def _mean(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float('nan')
