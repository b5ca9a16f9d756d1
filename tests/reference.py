"""Obviously-correct float64 NumPy references for the tests."""

import math

import numpy as np


def mlp_per_example_gradients(weights, x, y):
  """Per-example gradients of softmax cross-entropy of a ReLU MLP, by hand.

  Args:
    weights: [(W [fan_in, fan_out], b [fan_out]), ...], ReLU after all but the last.
    x: [batch, inputs].
    y: [batch] int labels.

  Returns:
    [batch, *shape] float64 arrays in the order W1, b1, W2, b2, ...

  For logits z = a W + b: d loss / d z = softmax(z) - onehot(y); back through a
  layer, d loss / d a = delta W^T, and through ReLU, times (preactivation > 0);
  d loss / d W = outer(a, delta) and d loss / d b = delta, example by example.
  """
  weights = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in weights]
  activations, preactivations = [np.asarray(x, np.float64)], []
  for i, (w, b) in enumerate(weights):
    z = activations[-1] @ w + b
    preactivations.append(z)
    activations.append(np.maximum(z, 0) if i < len(weights) - 1 else z)
  logits = activations[-1]
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  delta = p - np.eye(logits.shape[1])[y]
  grads = []
  for i in reversed(range(len(weights))):
    grads.append(delta)  # bias
    grads.append(np.einsum('bi,bo->bio', activations[i], delta))  # kernel
    if i > 0:
      delta = (delta @ weights[i][0].T) * (preactivations[i - 1] > 0)
  return grads[::-1]


def winsorized_sum(per_example, c):
  """sum_e clip(g_e, l, u), l and u nearest-rank percentiles, per coordinate."""
  per_example = np.asarray(per_example, np.float64)
  low, high = np.percentile(per_example, [c, 100 - c], axis=0, method='nearest')
  return np.clip(per_example, low, high).sum(axis=0)


def num_clipped(per_example, c):
  """How many entries winsorization changes (strictly outside their bounds)."""
  per_example = np.asarray(per_example, np.float64)
  low, high = np.percentile(per_example, [c, 100 - c], axis=0, method='nearest')
  return int(((per_example < low) | (per_example > high)).sum())


def aggregate(rule, per_example, **settings):
  """Obvious NumPy definitions on flat per-example gradients [B, P] -> [P], float64.

  Settings: k (trimmed_mean), c (winsorize), clip_norm (l2clip).
  """
  g = np.asarray(per_example, np.float64)
  batch = len(g)
  if rule == 'mean':
    return g.mean(axis=0)
  if rule == 'median':
    return np.median(g, axis=0)
  if rule == 'trimmed_mean':
    k = settings['k']
    return np.sort(g, axis=0)[k:batch - k].mean(axis=0)
  if rule == 'winsorize':
    low, high = np.percentile(g, [settings['c'], 100 - settings['c']], axis=0, method='nearest')
    return np.clip(g, low, high).mean(axis=0)
  if rule == 'l2clip':
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return (g * np.minimum(1.0, settings['clip_norm'] / np.maximum(norms, 1e-300))).mean(axis=0)
  raise ValueError(f'no reference for {rule!r}')


def dp_sgd_epsilon(sampling_rate, noise_multiplier, steps, delta,
                   orders=(*range(2, 64), 128, 256, 512, 1024)):
  """(epsilon, delta) of `steps` Poisson-subsampled Gaussian steps, by RDP at integer orders.

  Mironov, Talwar & Zhang (2019), Theorem 9: for integer order a, step RDP
  log(A_a) / (a - 1) with A_a = sum_i C(a, i) (1 - q)^(a - i) q^i exp((i^2 - i) / (2 sigma^2));
  then epsilon = min_a [steps RDP(a) + log(1 - 1/a) - log(delta a) / (a - 1)]
  (Balle et al. 2020, Proposition 12). Equals an accountant over more orders
  where that accountant's best order is an integer.
  """
  q, sigma = sampling_rate, noise_multiplier
  best = np.inf
  for a in orders:
    i = np.arange(a + 1)
    log_terms = (math.lgamma(a + 1) - np.array([math.lgamma(k + 1) + math.lgamma(a - k + 1)
                                                for k in i])
                 + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (2 * sigma ** 2))
    top = log_terms.max()
    log_a = top + math.log(np.exp(log_terms - top).sum())
    rdp = steps * log_a / (a - 1)
    best = min(best, rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
  return best


def per_example_gradients_float64(model, x, y):
  """Each example's gradient of its own softmax cross-entropy, one GradientTape per example.

  Args:
    model: a float64 Keras model (its layers made with dtype='float64').
    x: [batch, ...] inputs; y: [batch] int labels.

  Returns:
    One float64 array [batch, *variable.shape] per model.trainable_variables.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  per_variable = [[] for _ in model.trainable_variables]
  for e in range(len(y)):
    with tf.GradientTape() as tape:
      logits = model(x[e:e + 1], training=True)
      loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y[e:e + 1], logits=logits)[0]
    for grads, g in zip(per_variable, tape.gradient(loss, model.trainable_variables)):
      grads.append(tf.convert_to_tensor(g).numpy().astype(np.float64))
  return [np.stack(g) for g in per_variable]

