"""Trains an MLP on (label-noised) MNIST with SGD or winsorized SGD.

  python run.py --flagfile=flags/label_noise.cfg --noise=0.25 --logdir=runs/noise25
  python run.py --flagfile=flags/winsorized.cfg --noise=0.5 --winsor_c=4 --logdir=runs/w4

A rerun with the same --logdir resumes from its last checkpoint. Bad input
exits with status 2 and one line on stderr.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

flags.DEFINE_enum('dataset', 'mnist', ['mnist', 'fashion_mnist'],
                  'tfds dataset, used when --data_dir is not given.')
flags.DEFINE_string('data_dir', None, 'Directory with the four IDX files '
                    '(e.g. ../shared/data/mnist); if unset, the dataset comes from tfds.')
flags.DEFINE_integer('train_size', 0, 'Train on a fixed random subset of this many '
                     'training examples (0: all).')
flags.DEFINE_float('noise', 0.0, 'Fraction of training labels randomly permuted (§2.1).')
flags.DEFINE_integer('noise_seed', 0, 'Seed of the label noise and the training subset.')
flags.DEFINE_integer('seed', 0, 'Seed of the initialisation and the minibatch order.')
flags.DEFINE_list('hidden', ['2048'], 'Hidden layer widths, e.g. 2048 or 256,256,256.')
flags.DEFINE_enum('init', 'paper', ['paper', 'glorot_uniform'],
                  "'paper': N(0,1)*2/sqrt(fan_in+fan_out), as the authors' code.")
flags.DEFINE_float('learning_rate', 0.1, 'Constant SGD learning rate.')
flags.DEFINE_integer('batch_size', 100, 'Minibatch size; 0 for full-batch gradient descent.')
flags.DEFINE_integer('steps', 100_000, 'Number of training steps.')
flags.DEFINE_integer('eval_every', 10_000, 'Evaluate every this many steps, besides '
                     'the log-spaced steps 0-9, 10-90, 100-900, 1000-9000.')
flags.DEFINE_integer('checkpoint_every', 5_000, 'Checkpoint every this many steps.')
flags.DEFINE_float('winsor_c', 0.0, 'Winsorize per-example gradients at the c-th and '
                   '(100-c)-th percentile of the minibatch (§3); 0 is plain SGD.')
flags.DEFINE_enum('winsor_impl', 'fast', ['fast', 'reference'],
                  "'fast': outer products and top_k; 'reference': vectorized_map and "
                  'tfp.stats.percentile.')
flags.DEFINE_bool('deterministic', False, 'Enable TensorFlow op determinism (GPU).')
flags.DEFINE_integer('eval_batch_size', 10_000, 'Examples per evaluation forward pass.')
flags.DEFINE_integer('decomp_every', 0, 'Measure the §2.4 pristine/corrupt decomposition '
                     'every this many steps (0: off).')
flags.DEFINE_integer('decomp_dense_steps', 10, '...and at every step up to this one.')
flags.DEFINE_integer('null_worlds', 3, 'Null worlds (permuted designations) for §2.4.')
flags.DEFINE_integer('decomp_sample_examples', 400, 'Examples in the sampled estimator.')
flags.DEFINE_integer('decomp_sample_weights', 300, 'Weights per layer in the sampled estimator.')
flags.DEFINE_string('logdir', None, 'Run directory: TensorBoard events, checkpoints, '
                    'examples.npz, config.json, flags.txt.')

FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f'run.py: error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e))


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; every setting is a --flag')
  if not FLAGS.logdir:
    fail('--logdir is required: the run directory for events and checkpoints')
  # TensorFlow is imported only once the flags, the run directory and the data
  # are known to be good, so that bad input fails fast and in one line.
  from cg_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from cg_tf import data  # pylint: disable=g-import-not-at-top
  from cg_tf import workdir  # pylint: disable=g-import-not-at-top
  from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top
  try:
    hidden = tuple(int(h) for h in FLAGS.hidden)
  except ValueError:
    fail(f'--hidden={",".join(FLAGS.hidden)} must be comma-separated integers')
  try:
    config = config_lib.Config(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_size=FLAGS.train_size,
        noise=FLAGS.noise, noise_seed=FLAGS.noise_seed, seed=FLAGS.seed, hidden=hidden,
        init=FLAGS.init, learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size,
        steps=FLAGS.steps, eval_every=FLAGS.eval_every,
        checkpoint_every=FLAGS.checkpoint_every, winsor_c=FLAGS.winsor_c,
        winsor_impl=FLAGS.winsor_impl, deterministic=FLAGS.deterministic,
        eval_batch_size=FLAGS.eval_batch_size, decomp_every=FLAGS.decomp_every,
        decomp_dense_steps=FLAGS.decomp_dense_steps, null_worlds=FLAGS.null_worlds,
        decomp_sample_examples=FLAGS.decomp_sample_examples,
        decomp_sample_weights=FLAGS.decomp_sample_weights)
    workdir.prepare(FLAGS.logdir, config)
    own_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
    workdir.write_atomic(os.path.join(FLAGS.logdir, 'flags.txt'),
                         ''.join(f.serialize() + '\n' for f in own_flags).encode())
    dataset = data.load(config.dataset, config.data_dir)
    from cg_tf import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, FLAGS.logdir, dataset)
  except UserInputError as e:
    fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
