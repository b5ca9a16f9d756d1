"""reproduce.py's bookkeeping: which runs exist at each scale, and which are finished."""

import os
import subprocess
import sys

from absl.testing import parameterized
import tensorflow as tf

from analysis import reproduce
from cg_tf import config as config_lib
from cg_tf import workdir


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReproduceTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(['--seeds=0'], ['--parallel=0'], ['--experiments=label_noise,typo'],
                            ['--data_dir=/nonexistent/mnist'], ['--out=/proc/cg_tf_repro'])
  def test_bad_input_is_one_line_and_exit_2(self, bad_flag):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'reproduce.py'),
                             bad_flag], cwd=self.create_tempdir().full_path, capture_output=True,
                            text=True, timeout=120)
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertEqual(result.stdout, '')
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertStartsWith(lines[0], 'reproduce.py: error: ')

  def test_run_specs(self):
    specs = reproduce.run_specs('mini', 2, ['label_noise', 'decomposition', 'winsorized'])
    self.assertLen(specs, 2 * (5 + 25))
    names = [name for name, _ in specs]
    self.assertLen(set(names), len(names))
    self.assertIn('winsorized/n0.5_c4', names)
    self.assertIn('label_noise/noise0.25_s1', names)
    flags = dict(specs)['winsorized/n0.5_c4']
    self.assertIn('--flagfile=flags/winsorized_cpu.cfg', flags)
    self.assertIn('--winsor_c=4', flags)
    self.assertIn('--flagfile=flags/decomposition_cpu.cfg', dict(specs)['label_noise/noise0.25'])
    self.assertIn('--flagfile=flags/label_noise_cpu.cfg', dict(specs)['label_noise/noise0'])
    self.assertIn('--seed=1', dict(specs)['label_noise/noise0.25_s1'])
    only_decomposition = [name for name, _ in reproduce.run_specs('mini', 1, ['decomposition'])]
    self.assertEqual(only_decomposition, [f'label_noise/noise{n}' for n in ('0.25', '0.5', '0.75')])
    full = dict(reproduce.run_specs('full', 1, ['label_noise']))
    self.assertIn('--flagfile=flags/label_noise.cfg', full['label_noise/noise1'])

  def test_winsor_c(self):
    self.assertEqual(reproduce.winsor_c(['--noise=0.5', '--winsor_c=4']), 4.0)
    self.assertEqual(reproduce.winsor_c(['--noise=0.5']), 0.0)

  def test_seed_dirs(self):
    self.assertEqual(reproduce.seed_dirs('runs/a', 3), ['runs/a', 'runs/a_s1', 'runs/a_s2'])

  def test_is_complete(self):
    run_dir = self.create_tempdir()
    self.assertFalse(reproduce.is_complete(run_dir.full_path))
    workdir.prepare(run_dir.full_path, config_lib.Config(steps=3000))
    run_dir.create_file('checkpoints/checkpoint', 'model_checkpoint_path: "ckpt-2000"\n')
    self.assertFalse(reproduce.is_complete(run_dir.full_path))
    run_dir.create_file('checkpoints/checkpoint', 'model_checkpoint_path: "ckpt-3000"\n')
    self.assertTrue(reproduce.is_complete(run_dir.full_path))
