"""Trains tiny configs on N logical CPU replicas; tests/test_distribute.py compares the runs.

Logical CPU devices can only be configured before TensorFlow starts, and one
process holds one MirroredStrategy size, so each replica count is its own
process. It trains every case of the JSON object {name: config overrides}, one
after another, each in WORKDIR/name:

  python -m tests.replica_runs N '{"winsorized": {"winsor_c": 2}}' WORKDIR

N = 1 is the default strategy (one device). Each run trains (or resumes), then
writes the final model weights, per-example learning steps and forgetting
counts, as checkpointed, to WORKDIR/name/weights.npz. The last line printed is
one JSON object {name: final metrics}.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

from cg_tf import distribute
from cg_tf import train
from cg_tf.config import Config
from tests.test_train import separable_dataset

SETTINGS = dict(hidden=(16, 8), batch_size=100, steps=50, eval_every=25, checkpoint_every=25,
                learning_rate=0.1, eval_batch_size=64, noise=0.5)


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
    config = Config(**{**SETTINGS, **overrides})
    final_metrics[name] = train.train_and_evaluate(config, run_dir, separable_dataset(),
                                                   strategy)
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
