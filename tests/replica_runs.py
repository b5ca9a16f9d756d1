"""Trains tiny configs on N logical CPU replicas; tests/test_distribute.py compares the runs.

Logical CPU devices can only be configured before TensorFlow starts, and one
process holds one MirroredStrategy size, so each replica count is its own
process. It trains every case of the JSON object {name: config overrides}, one
after another, each in WORKDIR/name:

  python -m tests.replica_runs N '{"winsorized": {"winsor_c": 2}}' WORKDIR

N = 1 is the default strategy (one device). Each run trains (or resumes), then
writes the final model weights, per-example learning steps and forgetting
counts, as checkpointed, to WORKDIR/name/weights.npz. The last line printed is
one JSON object {name: final metrics and resumed_from, the step of the
checkpoint it started from (0 for none)}.

A case with "fit": {"aggregator": NAME, ...settings} instead trains the zoo's
convolutional model (tests/fixtures.py) through cg_tf.keras.with_aggregator
and Keras' fit, built under the strategy's scope, on 90 fixed examples in
batches of 20 (the last one of 10) for 2 epochs, and writes its final weights.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

from cg_tf import distribute
from cg_tf import train
from cg_tf.config import Config
from tests import fixtures

SETTINGS = dict(hidden=(16, 8), batch_size=100, steps=50, eval_every=25, checkpoint_every=25,
                learning_rate=0.1, eval_batch_size=64, noise=0.5)


def fit(strategy, settings, run_dir):
  """Trains the zoo's conv2d model through with_aggregator + fit; writes weights.npz."""
  import keras  # pylint: disable=g-import-not-at-top
  import cg_tf.keras  # pylint: disable=g-import-not-at-top
  from cg_tf import aggregators  # pylint: disable=g-import-not-at-top
  from tests import fixtures  # pylint: disable=g-import-not-at-top
  settings = dict(settings)
  with strategy.scope():
    model = cg_tf.keras.with_aggregator(fixtures.zoo_model('conv2d'),
                                        aggregators.get(settings.pop('aggregator'), **settings))
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=['accuracy'])
  x, y = fixtures.zoo_batch('conv2d', 90)
  history = model.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0)
  os.makedirs(run_dir, exist_ok=True)
  np.savez(os.path.join(run_dir, 'weights.npz'),
           **{f'weight_{i}': w for i, w in enumerate(model.get_weights())})
  return {key: values[-1] for key, values in history.history.items()}


def main():
  replicas, cases, workdir = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
  if replicas == 1:
    strategy = distribute.make_strategy('default')
  else:
    strategy = distribute.make_strategy('mirrored', cpu_replicas=replicas)
  assert strategy.num_replicas_in_sync == replicas, strategy.num_replicas_in_sync
  final_metrics = {}
  for name, overrides in cases.items():
    run_dir = os.path.join(workdir, name)
    if 'fit' in overrides:
      final_metrics[name] = fit(strategy, overrides['fit'], run_dir)
      continue
    config = Config(**{**SETTINGS, **overrides})
    checkpoint = tf.train.latest_checkpoint(os.path.join(run_dir, 'checkpoints'))
    final_metrics[name] = train.train_and_evaluate(config, run_dir, fixtures.separable_dataset(),
                                                   strategy)
    final_metrics[name]['resumed_from'] = int(checkpoint.rsplit('-', 1)[1]) if checkpoint else 0
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(run_dir,
                                                                              'checkpoints')))
    np.savez(os.path.join(run_dir, 'weights.npz'),
             **{variable.replace('/', '.'): reader.get_tensor(variable)
                for variable in reader.get_variable_to_shape_map()
                if variable.startswith(('optimizer/_trainable_variables/', 'first_learned_step',
                                    'forgetting_events', 'correct_presentations',
                                    'last_correct'))})
  print(json.dumps(final_metrics))


if __name__ == '__main__':
  main()
