"""Trains a tiny config on N logical CPU replicas; tests/test_distribute.py compares the runs.

Logical CPU devices can only be configured before TensorFlow starts, and one
process holds one MirroredStrategy size, so each run is its own process:

  python -m tests.replica_runs N '{"winsor_c": 2}' WORKDIR

N = 1 is the default strategy (one device). The run trains (or resumes) in
WORKDIR, then writes the final model weights, per-example learning steps and
forgetting counts, as checkpointed, to WORKDIR/weights.npz and
prints the final metrics as one JSON line.
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
  replicas, overrides, workdir = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
  if replicas == 1:
    strategy = distribute.make_strategy('default')
  else:
    strategy = distribute.make_strategy('mirrored', cpu_replicas=replicas)
  config = Config(**{**SETTINGS, **overrides})
  metrics = train.train_and_evaluate(config, workdir, separable_dataset(), strategy)
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(workdir,
                                                                            'checkpoints')))
  np.savez(os.path.join(workdir, 'weights.npz'),
           **{name.replace('/', '.'): reader.get_tensor(name)
              for name in reader.get_variable_to_shape_map()
              if name.startswith(('optimizer/_trainable_variables/', 'first_learned_step',
                                  'forgetting_events', 'correct_presentations', 'last_correct'))})
  print(json.dumps({'replicas': strategy.num_replicas_in_sync, 'metrics': metrics}))


if __name__ == '__main__':
  main()
