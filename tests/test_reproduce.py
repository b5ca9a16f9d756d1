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
                            ['--data_dir=/nonexistent/mnist'], ['--out=/proc/cg_tf_repro'],
                            ['--shard=3/2'], ['--shard=1'], ['--devices=0,x'],
                            ['--devices=0,1', '--parallel=3'], ['--only=no_such_run'])
  def test_bad_input_is_one_line_and_exit_2(self, *bad_flags):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'reproduce.py'),
                             *bad_flags, '--list'], cwd=self.create_tempdir().full_path, capture_output=True,
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

  def test_coherence_and_aggregator_specs_are_opt_in(self):
    default = reproduce.run_specs('mini', 1, list(reproduce.PAPER_EXPERIMENTS))
    self.assertFalse([n for n, _ in default if n.startswith(('coherence/', 'aggregators/'))])
    coherence = dict(reproduce.run_specs('full', 1, ['coherence']))
    self.assertEqual(sorted(coherence), sorted(f'coherence/noise{n:g}' for n in reproduce.NOISES))
    self.assertIn('--flagfile=flags/coherence.cfg', coherence['coherence/noise0.5'])
    aggregators = dict(reproduce.run_specs('mini', 2, ['aggregators']))
    self.assertLen(aggregators, 2 * 3 * len(reproduce.AGGREGATOR_GRID))
    self.assertEqual(aggregators['aggregators/n0.5_trimmed_mean_k2_s1'],
                     ['--flagfile=flags/aggregators_cpu.cfg', '--noise=0.5',
                      '--aggregator=trimmed_mean', '--trim_k=2', '--seed=1', '--noise_seed=1'])
    self.assertIn('--noise_multiplier=0.5', aggregators['aggregators/n1_dp_C1_sigma0.5'])
    for flagfile in ('coherence', 'coherence_cpu', 'aggregators', 'aggregators_cpu'):
      self.assertTrue(os.path.exists(os.path.join(ROOT, 'flags', flagfile + '.cfg')), flagfile)

  def test_winsor_c(self):
    self.assertEqual(reproduce.winsor_c(['--noise=0.5', '--winsor_c=4']), 4.0)
    self.assertEqual(reproduce.winsor_c(['--noise=0.5']), 0.0)

  def test_seed_dirs(self):
    self.assertEqual(reproduce.seed_dirs('runs/a', 3), ['runs/a', 'runs/a_s1', 'runs/a_s2'])

  def test_is_finished(self):
    run_dir = self.create_tempdir()
    self.assertFalse(workdir.is_finished(run_dir.full_path))
    workdir.prepare(run_dir.full_path, config_lib.Config(steps=3000))
    self.assertFalse(workdir.is_finished(run_dir.full_path))
    workdir.save_final_metrics(run_dir.full_path, 2000, {'train/accuracy': 0.5})
    self.assertFalse(workdir.is_finished(run_dir.full_path))
    workdir.save_final_metrics(run_dir.full_path, 3000, {'train/accuracy': 0.5})
    self.assertTrue(workdir.is_finished(run_dir.full_path))
    specs = [('a', []), ('b', [])]
    self.assertEqual(reproduce.unfinished(specs, run_dir.full_path), specs)

  @parameterized.parameters(1, 2, 3, 7)
  def test_shards_cover_every_run_once(self, n):
    specs = reproduce.run_specs('full', 2, ['label_noise', 'decomposition', 'winsorized'])
    parts = [reproduce.shard(specs, k, n) for k in range(1, n + 1)]
    names = [name for part in parts for name, _ in part]
    self.assertCountEqual(names, [name for name, _ in specs])
    self.assertLessEqual(max(map(len, parts)) - min(map(len, parts)), 1)
    self.assertEqual(parts, [reproduce.shard(specs, k, n) for k in range(1, n + 1)])

  def test_only_selects_by_pattern(self):
    specs = reproduce.run_specs('mini', 1, ['label_noise', 'winsorized'])
    chosen = reproduce.selected(specs, ['winsorized/n1_c*', 'label_noise/noise0'])
    self.assertEqual([name for name, _ in chosen],
                     ['label_noise/noise0'] + [f'winsorized/n1_c{c}' for c in (0, 1, 2, 4, 8)])
    self.assertEqual(reproduce.selected(specs, []), specs)

  def test_list_prints_every_command_of_a_shard(self):
    out = self.create_tempdir().full_path
    lines = []
    for k in (1, 2):
      result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'reproduce.py'),
                               '--scale=full', f'--out={out}', '--list', f'--shard={k}/2'],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
      self.assertEqual(result.returncode, 0, result.stderr)
      lines += result.stdout.strip().splitlines()
    self.assertLen(lines, 30)
    self.assertLen(set(lines), 30)
    for line in lines:
      self.assertStartsWith(line, f'cd {ROOT} && ')
      self.assertIn('run.py --flagfile=flags/', line)
      self.assertRegex(line, r'--logdir=\S+/runs/(label_noise|winsorized)/')
    self.assertFalse(os.path.exists(os.path.join(out, 'runs')))
