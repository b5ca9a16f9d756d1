"""run.py end to end, as a user runs it: events, examples.npz, bad input, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
from tbparse import SummaryReader

from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--hidden=32', '--batch_size=50', '--eval_every=100', '--checkpoint_every=100',
         '--eval_batch_size=500']


def run_py(*args, wait=True):
  command = [sys.executable, os.path.join(ROOT, 'run.py'), *args]
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def scalars(logdir):
  """Last value written for each (tag, step): a resumed run rewrites a few steps."""
  frame = SummaryReader(logdir).tensors
  return frame.drop_duplicates(['tag', 'step'], keep='last').set_index(['tag', 'step'])['value']


@pytest.mark.slow
class RunTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = fixtures.fake_mnist_dir('run', num_train=500)

  def test_writes_events_examples_and_checkpoints(self):
    logdir = self.create_tempdir().full_path
    result = run_py(f'--data_dir={self.data_dir}', '--noise=0.5', '--steps=200',
                    f'--logdir={logdir}', *SMALL)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    values = scalars(logdir)
    tags = set(values.index.get_level_values('tag'))
    for tag in ('train/accuracy', 'train/loss', 'train_pristine/accuracy',
                'train_corrupt/accuracy', 'train_clean/accuracy', 'test/accuracy', 'test/loss',
                'overfit', 'steps_per_second', 'train_batch/loss', 'dead_units/hidden_1',
                'train/most_common_prediction'):
      self.assertIn(tag, tags)
    steps = sorted(values['train/accuracy'].index)
    self.assertEqual(steps[:11], list(range(10)) + [10])
    self.assertEqual(steps[-1], 200)
    ta, va = values[('train/accuracy', 200)], values[('test/accuracy', 200)]
    self.assertAlmostEqual(values[('overfit', 200)], ta - (0.5 * 0.1 + 0.5 * va), places=5)
    record = np.load(os.path.join(logdir, 'examples.npz'))
    for key in ('label', 'train_label', 'corrupt', 'first_learned_step', 'learned_since_step'):
      self.assertEqual(record[key].shape, (500,))
    np.testing.assert_array_equal(record['corrupt'], record['label'] != record['train_label'])
    self.assertAlmostEqual(record['corrupt'].mean(), 0.45, delta=0.06)
    self.assertIn('--noise=0.5', open(os.path.join(logdir, 'flags.txt')).read())
    self.assertEqual(json.load(open(os.path.join(logdir, 'config.json')))['noise'], 0.5)
    self.assertTrue(tf.train.latest_checkpoint(os.path.join(logdir, 'checkpoints')))

  def test_killed_run_resumes_to_the_same_numbers(self):
    flags = [f'--data_dir={self.data_dir}', '--noise=0.25', '--steps=1500', *SMALL]
    whole = self.create_tempdir().full_path
    self.assertEqual(run_py(*flags, f'--logdir={whole}').returncode, 0)

    killed = self.create_tempdir().full_path
    process = run_py(*flags, f'--logdir={killed}', wait=False)
    index = os.path.join(killed, 'checkpoints', 'ckpt-300.index')
    deadline = time.time() + 300
    while not os.path.exists(index) and process.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    final = os.path.join(killed, 'checkpoints', 'ckpt-1500.index')
    self.assertFalse(os.path.exists(final), 'the run finished before it could be killed')

    resumed = run_py(*flags, f'--logdir={killed}')
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn('resuming at step', resumed.stderr)
    a, b = scalars(whole), scalars(killed)
    for tag in ('train/accuracy', 'train/loss', 'test/accuracy', 'train_corrupt/accuracy'):
      self.assertEqual(a[(tag, 1500)], b[(tag, 1500)], tag)
    ra, rb = (np.load(os.path.join(d, 'examples.npz')) for d in (whole, killed))
    for key in ra.files:
      np.testing.assert_array_equal(ra[key], rb[key], key)

  @parameterized.named_parameters(
      ('noise_above_one', ['--noise=1.5'], '--noise=1.5 must be in [0, 1]'),
      ('zero_learning_rate', ['--learning_rate=0'], '--learning_rate'),
      ('negative_steps', ['--steps=-3'], '--steps=-3'),
      ('winsor_c_50', ['--winsor_c=50'], '--winsor_c=50'),
      ('bad_hidden', ['--hidden=256,x'], '--hidden'),
      ('bad_enum', ['--init=xavier'], '--init'),
      ('missing_data_dir', ['--data_dir=/nonexistent/mnist'], 'not a directory'),
  )
  def test_bad_input_is_one_line_and_exit_2(self, args, message):
    logdir = [] if not args else [f'--logdir={self.create_tempdir().full_path}/run']
    result = run_py(*args, *logdir)
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertStartsWith(lines[0], 'run.py: error: ')
    self.assertIn(message, lines[0])

  def test_divergence_is_one_line_and_keeps_the_last_good_checkpoint(self):
    logdir = self.create_tempdir().full_path
    flags = [f'--data_dir={self.data_dir}', '--steps=200', '--learning_rate=1e30', *SMALL,
             f'--logdir={logdir}']
    for attempt in range(2):  # the rerun resumes from step 0 and stops the same way
      result = run_py(*flags)
      self.assertEqual(result.returncode, 1, result.stderr[-2000:])
      self.assertNotIn('Traceback', result.stderr)
      last = result.stderr.strip().splitlines()[-1]
      self.assertRegex(last, r'^run\.py: error: training diverged at step 1: the training '
                       r'loss is nan\. Kept: .*ckpt-0\)\. Try a --learning_rate smaller than '
                       r'1e\+30 in a new --logdir$')
      self.assertEqual(('resuming at step 0' in result.stderr), attempt == 1)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(logdir,
                                                                              'checkpoints')))
    for name in reader.get_variable_to_shape_map():
      if name.startswith('optimizer/_trainable_variables/'):
        self.assertTrue(np.all(np.isfinite(reader.get_tensor(name))), name)
    values = scalars(logdir)
    self.assertTrue(np.isfinite(values[('train/loss', 0)]))
    self.assertTrue(np.isnan(values[('train/loss', 1)]))
    self.assertFalse(os.path.exists(os.path.join(logdir, 'final_metrics.json')))

  def test_default_logdir_and_packaged_mnist(self):
    cwd = self.create_tempdir().full_path
    command = [sys.executable, os.path.join(ROOT, 'run.py'), '--train_size=500', '--steps=20',
               '--noise=0.5', '--winsor_c=4', *SMALL]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    logdir = os.path.join('runs', 'mnist_32_500ex_n0.5_c4_s0')
    self.assertIn(f'writing to --logdir={logdir}', result.stderr)
    with open(os.path.join(cwd, logdir, 'final_metrics.json')) as f:
      self.assertEqual(json.load(f)['step'], 20)
    self.assertIsNone(json.load(open(os.path.join(cwd, logdir, 'config.json')))['data_dir'])
    # The log is the progress lines: no TensorFlow INFO line per checkpoint.
    self.assertNotIn('Sharding callback', result.stderr)

  def test_malformed_data_dir(self):
    directory = self.create_tempdir()
    for stem in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
      directory.create_file(stem, 'this is not IDX')
    result = run_py(f'--data_dir={directory.full_path}',
                    f'--logdir={self.create_tempdir().full_path}')
    self.assertEqual(result.returncode, 2)
    self.assertRegex(result.stderr.strip(), r'^run\.py: error: .*not an IDX file')

  def test_unwritable_logdir(self):
    blocker = self.create_tempfile('a_file')
    result = run_py(f'--data_dir={self.data_dir}', f'--logdir={blocker.full_path}/run')
    self.assertEqual(result.returncode, 2)
    self.assertRegex(result.stderr.strip(), r'^run\.py: error: --logdir=.* is not writable')

  def test_other_settings_in_logdir_are_refused_and_kept(self):
    logdir = self.create_tempdir().full_path
    flags = [f'--data_dir={self.data_dir}', '--steps=20', *SMALL, f'--logdir={logdir}']
    self.assertEqual(run_py(*flags, '--noise=0.25').returncode, 0)
    before = {name: open(os.path.join(logdir, name), 'rb').read()
              for name in ('config.json', 'flags.txt', 'examples.npz')}
    result = run_py(*flags, '--noise=0.5')
    self.assertEqual(result.returncode, 2)
    self.assertIn('noise=0.25 there vs 0.5 now', result.stderr)
    for name, content in before.items():
      self.assertEqual(open(os.path.join(logdir, name), 'rb').read(), content, name)
