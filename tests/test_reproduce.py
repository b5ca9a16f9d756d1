"""reproduce.py's bookkeeping: which runs exist at each scale, and which are finished."""

import csv
import dataclasses
import os
import re
import subprocess
import sys
from unittest import mock

from absl.testing import parameterized
import pytest
import tensorflow as tf

from analysis import claims
from analysis import reproduce
from cg_tf import config as config_lib
from cg_tf import train
from cg_tf import workdir
from cg_tf.errors import UserInputError
from tests import fixtures


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReproduceTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(['--seeds=0'], ['--parallel=0'], ['--experiments=label_noise,typo'],
                            ['--data_dir=/nonexistent/mnist'], ['--out=/proc/cg_tf_repro'],
                            ['--shard=3/2'], ['--shard=1'], ['--devices=0,x'],
                            ['--devices=0,1', '--parallel=3'], ['--only=no_such_run'],
                            ['--compare_with=/nonexistent/REPORT.md'],
                            ['--report_dir=/proc/cg_tf_report'])
  @pytest.mark.slow
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
    self.assertFalse([n for n, _ in default if n.startswith(('coherence/', 'aggregators'))])
    every_example = dict(reproduce.run_specs('full', 1, ['aggregators_60k']))
    self.assertLen(every_example, 3 * len(reproduce.CHEAP_AGGREGATORS))
    self.assertEqual(every_example['aggregators_60k/n1_dp_C1_sigma0.5'],
                     ['--flagfile=flags/winsorized.cfg', '--noise=1.0', '--aggregator=dp',
                      '--clip_norm=1', '--noise_multiplier=0.5', '--seed=0', '--noise_seed=0'])
    self.assertLessEqual(set(reproduce.CHEAP_AGGREGATORS),
                         {label for label, _ in reproduce.AGGREGATOR_GRID})
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

  def test_cnn_specs(self):
    cnn = dict(reproduce.run_specs('full', 2, ['cnn']))
    self.assertLen(cnn, 2 * (25 + 5 + 3))
    self.assertEqual(cnn['cnn/long_n0.75_s1'], ['--flagfile=flags/cnn_label_noise_long.cfg',
                                                '--noise=0.75', '--seed=1', '--noise_seed=1'])
    self.assertEqual(cnn['cnn/n0.25_c0'], ['--flagfile=flags/cnn_decomposition.cfg',
                                           '--noise=0.25', '--winsor_c=0', '--seed=0',
                                           '--noise_seed=0'])
    self.assertIn('--flagfile=flags/cnn_winsorized.cfg', cnn['cnn/n1_c0'])
    self.assertEqual(cnn['cnn/coherence_n0.5_s1'], ['--flagfile=flags/cnn_coherence.cfg',
                                                    '--noise=0.5', '--seed=1', '--noise_seed=1'])
    mini = dict(reproduce.run_specs('mini', 1, ['cnn']))
    self.assertLen(mini, 25 + 5)  # at 2,500 examples Figure 1's runs fit in 2,500 steps
    self.assertIn('--flagfile=flags/cnn_coherence_cpu.cfg', mini['cnn/coherence_n0'])
    # The grid's patterns leave the coherence runs out.
    self.assertNotIn('cnn/coherence_n1', dict(reproduce.selected(list(cnn.items()), ['cnn/n1_c*'])))
    for flagfile in ('cnn_coherence', 'cnn_coherence_cpu', 'cnn_label_noise_long'):
      self.assertTrue(os.path.exists(os.path.join(ROOT, 'flags', flagfile + '.cfg')), flagfile)
    self.assertEqual(reproduce.coherence_names('full', 'cnn'),
                     ('coherence_cnn.png', 'COHERENCE_cnn.md'))
    self.assertEqual(reproduce.coherence_names('mini', 'cnn'),
                     ('coherence_cnn_mini.png', 'COHERENCE_cnn_mini.md'))
    self.assertEqual(reproduce.coherence_names('full'), ('coherence.png', 'COHERENCE.md'))

  def test_cnn_fit_check_waits_for_the_long_runs_at_full_scale_only(self):
    out = self.get_temp_dir()
    full = reproduce.checks_for_seed(out, '', ['cnn'], 'full')
    longer = [v for k, v in full.items()
              if k[1].endswith(', trained for 200,000 steps at 50-100% noise')]
    self.assertLen(longer, 2)  # time to 90% and all fit
    claims_in_order = [claim for _, claim, _ in full]
    for claim in ('time to a given training accuracy grows with noise',
                  'all variants fit their training set'):
      self.assertEqual(claims_in_order[claims_in_order.index(claim) + 1],
                       claim + ', trained for 200,000 steps at 50-100% noise')
    for verdict in longer:
      self.assertEqual(verdict.measured, 'waiting for cnn/n0_c0, cnn/n0.25_c0, '
                       'cnn/long_n0.5, cnn/long_n0.75, cnn/long_n1')
    self.assertEqual(reproduce.cnn_fit_runs(),  # also what figure1_cnn_long.png is drawn from
                     {0.0: 'cnn/n0_c0', 0.25: 'cnn/n0.25_c0', 0.5: 'cnn/long_n0.5',
                      0.75: 'cnn/long_n0.75', 1.0: 'cnn/long_n1'})
    mini = reproduce.checks_for_seed(out, '', ['cnn'], 'mini')
    self.assertLen(mini, len(full) - 2)

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
    # Written by another version of cg_tf: still finished, and not read as this version's.
    fixtures.add_unknown_setting(run_dir.full_path)
    self.assertTrue(workdir.is_finished(run_dir.full_path))
    with self.assertRaisesRegex(UserInputError, r'does not know \(future_setting\)'):
      workdir.read_config(run_dir.full_path)
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

  @pytest.mark.slow
  def test_list_prints_every_command_of_a_shard(self):
    out = self.create_tempdir().full_path
    lines = []
    for k in (1, 2):
      result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'reproduce.py'),
                               '--scale=full', f'--out={out}', '--list', f'--shard={k}/2'],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
      self.assertEqual(result.returncode, 0, result.stderr)
      lines += result.stdout.strip().splitlines()
    self.assertLen(lines, 40)  # 5 label-noise, 25 winsorized and 10 full-batch runs
    self.assertLen(set(lines), 40)
    for line in lines:
      self.assertStartsWith(line, f'cd {ROOT} && ')
      self.assertIn('run.py --flagfile=flags/', line)
      self.assertRegex(line, r'--logdir=\S+/runs/(label_noise|winsorized|full_batch)/')
    self.assertFalse(os.path.exists(os.path.join(out, 'runs')))

  @pytest.mark.slow
  def test_list_into_a_closed_pipe_is_quiet(self):
    result = subprocess.run(f'{sys.executable} analysis/reproduce.py --scale=full --list | head -1',
                            shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    self.assertLen(result.stdout.splitlines(), 1)
    self.assertNotIn('Traceback', result.stderr)


@pytest.mark.slow
class PartialReportTest(tf.test.TestCase):
  """--report_only on an OUT where some full-scale runs are finished: tiny real runs stand in."""

  def test_report_from_finished_runs_only(self):
    out = self.create_tempdir().full_path
    dataset = fixtures.separable_dataset(num_train=100)
    # The 100% noise row of Figure 4 finished, one cell of the 50% row unfinished.
    for c in reproduce.CS:
      train.train_and_evaluate(fixtures.tiny_config(noise=1.0, winsor_c=c, steps=20),
                               os.path.join(out, 'runs', f'winsorized/n1_c{c}'), dataset)
    # A second seed of one cell only: the other cells' checks count one seed.
    train.train_and_evaluate(fixtures.tiny_config(noise=1.0, winsor_c=8, steps=20, seed=1),
                             os.path.join(out, 'runs', 'winsorized/n1_c8_s1'), dataset)
    unfinished = os.path.join(out, 'runs', 'winsorized/n0.5_c2')
    train.train_and_evaluate(fixtures.tiny_config(noise=0.5, winsor_c=2, steps=10), unfinished,
                             dataset)
    # As if killed at step 10 of 20.
    longer = dataclasses.replace(workdir.read_config(unfinished), steps=20)
    with open(os.path.join(unfinished, workdir.CONFIG_FILE), 'w') as f:
      f.write(longer.to_json())
    compared = self.create_tempfile(content=claims.as_markdown([
        {'section': '3.3', 'claim': 'c = 8 keeps training accuracy at most proper (100%)',
         'test': 't', 'measured': 'mini says 0.420', 'verdict': 'FAIL'}]))
    report_dir = os.path.join(out, 'docs')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'reproduce.py'),
                             '--scale=full', '--seeds=2', f'--out={out}', '--report_only',
                             f'--report_dir={report_dir}',
                             f'--compare_with={compared.full_path}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('0 runs trained', result.stdout)
    self.assertCountEqual(os.listdir(report_dir),
                          ['REPORT_full.md', 'figure4_full.png', 'figure4_full.pdf'])
    with open(os.path.join(report_dir, 'REPORT_full.md')) as f:
      text = f.read()
    self.assertIn('6 of 80 runs are finished', text)
    self.assertIn(f'| verdict (full) | measured ({compared.full_path}) |', text)
    row = next(line for line in text.splitlines()
               if 'c = 8 keeps training accuracy at most proper (100%)' in line)
    self.assertIn('mini says 0.420 | FAIL |', row)
    # Both seeds of this cell finished: the verdict is PASS exactly when both pass.
    verdict, passing = re.search(r'final train acc \d\.\d+ vs proper 0\.100 \| (PASS|FAIL) '
                                 r'\(([012])/2 seeds pass\) \|', row).groups()
    self.assertEqual(verdict == 'PASS', passing == '2')
    one_seed = next(line for line in text.splitlines()
                    if 'c = 2 keeps training accuracy at most proper (100%)' in line)
    verdict, passing = re.search(r'\| (PASS|FAIL) \(([01])/1 seeds pass; 1 not run\) \|',
                                 one_seed).groups()
    self.assertEqual(verdict == 'PASS', passing == '1')
    waiting = next(line for line in text.splitlines()
                   if 'c = 2 keeps training accuracy at most proper (50%)' in line)
    self.assertIn('waiting for winsorized/n0.5_c2 | NOT RUN |', waiting)
    self.assertIn('not checked', waiting)
    self.assertIn('![figure4_full.png](figure4_full.png)', text)


@pytest.mark.slow
class StepTimesTest(tf.test.TestCase):
  """The aggregator tables' step-time column: bench_step.py --csv, run by reproduce.py."""

  def test_bench_writes_run_py_steps_and_the_tables_show_them(self):
    out = self.create_tempdir().full_path
    # A tiny benchmark of the tiny runs' model; `authors` is a comparison method,
    # not run.py's step, so it is timed but not written.
    tiny_bench = ('--model=16', '--batch_size=20', '--c=10', '--seconds=0.02', '--rounds=1',
                  '--methods=sgd,fast,trimmed_mean,l2clip,authors')
    with mock.patch.object(reproduce, 'STEP_TIMES_BENCH', tiny_bench):
      reproduce.measure_step_times(out, None)
    with open(os.path.join(out, reproduce.STEP_TIMES_FILE)) as f:
      rows = list(csv.DictReader(f))
    self.assertEqual([r['setting'] for r in rows],
                     ['mean (SGD)', 'winsorize c=10', 'trimmed_mean k=2', 'l2clip C=1'])
    self.assertEqual({(r['hidden'], r['batch_size']) for r in rows}, {('16', '20')})
    self.assertEqual(float(rows[0]['ratio_to_sgd']), 1.0)
    for r in rows:  # ms are written to 4 decimals
      ratio = float(r['ms_per_step']) / float(rows[0]['ms_per_step'])
      self.assertAlmostEqual(float(r['ratio_to_sgd']), ratio, delta=1e-2 * ratio)
    # l2clip at C = 10 shares the measured step of C = 1.
    run_dir = os.path.join(out, 'runs', 'aggregators', 'n0.5_l2clip_C10')
    train.train_and_evaluate(
        fixtures.tiny_config(noise=0.5, aggregator='l2clip', clip_norm=10.0, steps=20), run_dir,
        fixtures.separable_dataset(num_train=100))
    report_dir = os.path.join(out, 'docs')
    os.makedirs(report_dir)
    self.assertEqual(reproduce.draw_figures(out, 1, ['aggregators'], report_dir, 'mini'),
                     ['aggregators.png'])
    with open(os.path.join(report_dir, 'AGGREGATORS.md')) as f:
      row = next(line for line in f if line.startswith('| 50% | l2clip C=10 |'))
    self.assertEqual(row.split('|')[10].strip(), f'{float(rows[3]["ratio_to_sgd"]):.1f}')
    # At full scale (12,000 examples) the figure and table have names of their own.
    self.assertEqual(reproduce.draw_figures(out, 1, ['aggregators'], report_dir, 'full'),
                     ['aggregators_12k.png'])
    self.assertTrue(os.path.exists(os.path.join(report_dir, 'AGGREGATORS_12k.md')))

  def test_a_failed_bench_costs_the_column_not_the_runs(self):
    out = self.create_tempdir().full_path
    with mock.patch.object(reproduce, 'STEP_TIMES_BENCH', ('--c=60',)):
      reproduce.measure_step_times(out, None)
    self.assertFalse(os.path.exists(os.path.join(out, reproduce.STEP_TIMES_FILE)))
    with open(os.path.join(out, 'logs', 'step_times.log')) as f:
      self.assertIn('must be numbers in (0, 50)', f.read())
