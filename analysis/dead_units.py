"""Dead ReLU units of runs, from their last checkpoints.

  python analysis/dead_units.py --runs='runs/winsorized/*' [--data_dir=DIR]

For each run, restores the last checkpoint in its checkpoints/ directory,
passes the run's training set (its subset and noisy labels, rebuilt from its
config.json) through the network, and prints a markdown row: the step, the
training accuracy, and for each hidden layer how many of its units no
training image activates. A unit that is zero for every image gets no
gradient from any of them; when a whole layer is dead, nothing below it
learns and the network predicts one class, which the last column shows.

Runs log the same fractions at every evaluation as `dead_units/<layer>`, and
the last column as `train/most_common_prediction`; this script answers for
runs made before those were logged, and for any checkpoint. The
runs kept in results/ have no checkpoints, so it reads runs trained on this
machine. `--data_dir` overrides the data directory a run was made with.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories or glob patterns.')
  flags.DEFINE_string('data_dir', None, 'MNIST IDX directory; default: each run\'s own.')
  cli.define_output('report', None, 'Also write the table to this markdown file.')


def without_checkpoint(run_dir):
  """Why `run_dir` has nothing to restore, or None; checked before TensorFlow loads."""
  if workdir.files(run_dir).exists(os.path.join(run_dir, 'checkpoints', 'checkpoint')):
    return None
  return (f'{run_dir} has no checkpoint (runs kept without checkpoints show dead units in '
          'their dead_units/ summaries, if they logged them)')


def dead_units(run_dir, data_dir):
  """(step, train accuracy, [dead units per hidden layer], [widths], most common prediction share)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cg_tf import train  # pylint: disable=g-import-not-at-top
  checkpoint = tf.train.latest_checkpoint(os.path.join(run_dir, 'checkpoints'))
  config = workdir.read_config(run_dir)
  noisy = data.make_noisy(data.load(config.dataset, data_dir or config.data_dir),
                          config.train_size, config.noise, config.noise_seed)
  experiment = train.Experiment(config, noisy)
  experiment.checkpoint().read(checkpoint).expect_partial()
  _, predictions, active = experiment.predict(noisy.data.train_images, noisy.train_labels)
  return (experiment.step, float(np.mean(predictions == noisy.train_labels)),
          [int(np.sum(~a)) for a in active], [a.size for a in active],
          float(np.bincount(predictions).max() / predictions.size))


def main(argv):
  del argv
  rows = []
  for run_dir in cli.run_directories(FLAGS.runs, without_checkpoint):
    try:
      step, accuracy, dead, widths, one_class = dead_units(run_dir, FLAGS.data_dir)
    except UserInputError as e:
      cli.fail(str(e))
    layers = ', '.join(f'{d} of {w}' for d, w in zip(dead, widths))
    rows.append(f'| {run_dir} | {step} | {accuracy:.4f} | {layers} | {one_class:.3f} |')
  cli.print_report('\n'.join(
      ['| run | step | train acc | dead units per hidden layer | most common prediction |',
       '|---|---|---|---|---|', *rows]) + '\n', FLAGS.report)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
