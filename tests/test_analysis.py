"""The analysis scripts, run as a user runs them, on tiny real run directories."""

import os
import subprocess
import sys

import pytest
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from analysis import figure1
from analysis import figures_2_3
from cg_tf import train
from cg_tf import workdir
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TableHelpersTest(parameterized.TestCase):
  """The per-example and §2.4 summaries the figure scripts print, against loops."""

  @parameterized.parameters(0, 1, 2, 3, 4)
  def test_leads_from_is_where_f_corrupt_stays_above(self, seed):
    f = np.random.default_rng(seed).random([12, 2])
    f[2 * seed:, 1] += 1  # f^c above f^p from index 2 * seed on, at least
    expected = next((i for i in range(len(f)) if all(f[j, 0] < f[j, 1] for j in range(i, len(f)))),
                    None)
    self.assertEqual(figures_2_3.leads_from(f), expected)
    self.assertLessEqual(expected, 2 * seed)

  def test_leads_from_known_answers(self):
    swings = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9], [0.2, 0.8]])
    self.assertEqual(figures_2_3.leads_from(swings), 3)
    self.assertEqual(figures_2_3.leads_from(swings[::-1]), None)
    self.assertEqual(figures_2_3.leads_from(swings[3:]), 0)
    self.assertEqual(figures_2_3.leads_from(np.array([[0.5, 0.5]])), None)  # a tie is not a lead

  def test_step_at_reads_the_step_of_an_event_and_none_for_never(self):
    steps = np.array([0, 10, 100, 1000])
    self.assertEqual(figures_2_3.step_at(steps, 2), 100)
    self.assertIsInstance(figures_2_3.step_at(steps, 2), int)
    self.assertIsNone(figures_2_3.step_at(steps, None))
    self.assertEqual(figures_2_3.step_at(steps, 0), 0)  # an event at the first measurement

  def test_between_is_the_range_from_the_crossing_to_the_lead(self):
    values = np.array([5.0, 0.5, -0.25, 3.0, 9.0])
    self.assertEqual(figures_2_3.between(values, 1, 4), '-0.25–3')
    for start, stop in ((None, 4), (1, None), (3, 3)):
      self.assertEqual(figures_2_3.between(values, start, stop), '-')

  def test_median_steps_pool_the_seeds_per_group(self):
    seeds = [{'corrupt': np.array([False, True, True]), 'first_learned_step': np.array([4, 10, -1])},
             {'corrupt': np.array([False, False, True]), 'first_learned_step': np.array([6, 8, 20])}]
    # pristine: 4, 6, 8 -> 6; corrupt: 10, 20, never -> 20
    self.assertEqual(figure1.median_steps(seeds, 'first_learned_step'), '6 / 20')
    clean = [{'corrupt': np.zeros(2, bool), 'first_learned_step': np.array([-1, -1])}]
    self.assertEqual(figure1.median_steps(clean, 'first_learned_step'), 'never / -')


@pytest.mark.slow
class AnalysisTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = os.path.join(os.environ.get('TEST_TMPDIR', '/tmp'), f'cg_tf_analysis_{os.getpid()}')
    dataset = fixtures.separable_dataset(num_train=120)
    cls.runs = []
    for noise, c, seed in ((0.0, 0, 0), (0.5, 0, 0), (0.5, 10, 0), (0.5, 0, 1)):
      run_dir = os.path.join(cls.root, f'n{noise}_c{c}' + (f'_s{seed}' if seed else ''))
      config = fixtures.tiny_config(noise=noise, winsor_c=c, seed=seed, noise_seed=seed,
                                      steps=40, decomp_every=20,
                                      decomp_dense_steps=10, decomp_sample_examples=30,
                                      decomp_sample_weights=10)
      train.train_and_evaluate(config, run_dir, dataset)
      cls.runs.append(run_dir)
    cls.aggregator_runs = []
    for noise, settings in ((0.5, {'aggregator': 'trimmed_mean', 'trim_k': 2}),
                            (0.5, {'aggregator': 'dp', 'clip_norm': 1.0, 'noise_multiplier': 1.0}),
                            (1.0, {'aggregator': 'rm3'}),
                            (1.0, {'aggregator': 'mean', 'learning_rate': 0.05})):
      run_dir = os.path.join(cls.root, f'aggregator_n{noise}_{settings["aggregator"]}')
      train.train_and_evaluate(fixtures.tiny_config(noise=noise, steps=20, **settings), run_dir,
                               dataset)
      cls.aggregator_runs.append(run_dir)
    cls.coherence_runs = []
    for noise in (0.0, 0.5):
      run_dir = os.path.join(cls.root, f'coherence_n{noise}')
      train.train_and_evaluate(fixtures.tiny_config(
          noise=noise, steps=40, coherence_every=20, decomp_dense_steps=3, stiffness_examples=50,
          forgetting=True), run_dir, dataset)
      cls.coherence_runs.append(run_dir)

  def test_figure1(self):
    out = os.path.join(self.root, 'figs', 'figure1.png')
    table = fixtures.run_script('figure1.py', f'--runs={",".join(self.runs[:2])}', f'--out={out}')
    self.assertTrue(os.path.getsize(out) > 10_000)
    self.assertTrue(os.path.exists(out.replace('.png', '.pdf')))
    self.assertIn('| 50% | 1 |', table)

  def test_seeds_are_averaged(self):
    out = os.path.join(self.root, 'figs', 'seeds.png')
    one_seed = fixtures.run_script('figure1.py', f'--runs={self.runs[1]}', f'--out={out}')
    two_seeds = fixtures.run_script('figure1.py', f'--runs={self.runs[1]},{self.runs[3]}', f'--out={out}')
    other_seed = fixtures.run_script('figure1.py', f'--runs={self.runs[3]}', f'--out={out}')
    final_train = [float(fixtures.row_for(table, '| 50% |').split('|')[4])
                   for table in (one_seed, two_seeds, other_seed)]
    self.assertIn('| 50% | 2 |', two_seeds)
    self.assertNotEqual(final_train[0], final_train[2])
    self.assertAlmostEqual(final_train[1], (final_train[0] + final_train[2]) / 2, delta=1e-4)
    table = fixtures.run_script('figures_2_3.py', f'--runs={self.runs[1]},{self.runs[3]}',
                       f'--out_dir={os.path.join(self.root, "seed_figs")}')
    self.assertIn('| 50% | 2 | actual |', table)

  def test_figure4(self):
    out = os.path.join(self.root, 'figs', 'figure4.png')
    table = fixtures.run_script('figure4.py', f'--runs={self.root}/n0.5_c*', f'--out={out}')
    self.assertTrue(os.path.getsize(out) > 10_000)
    self.assertIn('| 10 | 50% | 1 | 0.550 |', table)

  def test_figures_2_3(self):
    out_dir = os.path.join(self.root, 'figs')
    table = fixtures.run_script('figures_2_3.py', f'--runs={self.runs[1]}', f'--out_dir={out_dir}')
    for name in ('figure2.png', 'figure3.png'):
      self.assertTrue(os.path.getsize(os.path.join(out_dir, name)) > 10_000)
    rows = [line for line in table.splitlines() if line.startswith('| 50% |')]
    self.assertLen(rows, 4)  # the actual world and 3 null worlds
    f_pristine_at_0 = [float(row.split('|')[4]) for row in rows]
    self.assertTrue(all(0 < f < 1.5 for f in f_pristine_at_0), f_pristine_at_0)
    self.assertFalse(np.isnan(f_pristine_at_0).any())

  def test_coherence(self):
    out = os.path.join(self.root, 'figs', 'coherence.png')
    report = os.path.join(self.root, 'figs', 'coherence.md')
    table = fixtures.run_script('coherence.py', f'--runs={",".join(self.coherence_runs)}', f'--out={out}',
                       f'--report={report}')
    self.assertTrue(os.path.getsize(out) > 10_000)
    with open(report) as f:
      self.assertEqual(f.read(), table.strip() + '\n')
    self.assertIn('| quantity | 0% noise | 50% noise |', table)
    examples = workdir.read_examples(self.coherence_runs[1])
    corrupt, events = examples['corrupt'], examples['forgetting_events']
    row = fixtures.row_for(table, '| forgetting events per corrupt example |').split('|')
    self.assertEqual(row[2].strip(), '–')  # no corrupt examples at 0% noise
    self.assertAlmostEqual(float(row[3]), events[corrupt].mean(), delta=5e-3)
    record = workdir.read_measurements(self.coherence_runs[0], workdir.COHERENCE_FILE)
    row = fixtures.row_for(table, '| m-coherence at step 0 |').split('|')
    self.assertAlmostEqual(float(row[2]), record['m_coherence'][0, 0, -1],
                           delta=1e-2 * record['m_coherence'][0, 0, -1])

  def test_aggregators(self):
    out = os.path.join(self.root, 'figs', 'aggregators.png')
    # As bench_step.py --csv writes it: the step-time column matches a run by its
    # model, batch size and the setting that does the same work.
    step_times = os.path.join(self.root, 'step_times.csv')
    with open(step_times, 'w') as f:
      f.write('hidden,batch_size,setting,ms_per_step,ratio_to_sgd\n'
              '16,20,mean (SGD),1.0,1.0\n16,20,trimmed_mean k=2,4.2,4.2\n'
              '16,20,dp C=1 σ=1,2.5,2.5\n256,20,rm3,3.0,3.0\n16,100,rm3,3.5,3.5\n')
    table = fixtures.run_script('aggregators.py', f'--runs={",".join(self.aggregator_runs)}',
                       f'--out={out}', f'--step_times={step_times}')
    self.assertTrue(os.path.getsize(out) > 10_000)
    dp = fixtures.row_for(table, '| 50% | dp C=1 σ=1 |').split('|')
    metrics = workdir.read_scalars(self.aggregator_runs[1]).ffill().iloc[-1]
    self.assertAlmostEqual(float(dp[3]), metrics['test/accuracy'], delta=5e-4)
    self.assertIn(f'({metrics["dp/epsilon"]:.3g}, 1e-05)', dp[9])
    self.assertEqual(dp[10].strip(), '2.5')
    self.assertEqual(fixtures.row_for(table, '| 50% | trimmed_mean k=2 |').split('|')[10].strip(), '4.2')
    rm3 = fixtures.row_for(table, '| 100% | rm3 |').split('|')
    self.assertEqual(float(rm3[6]), 0.1)  # the proper accuracy at 100% noise
    self.assertEqual(rm3[9].strip(), '–')
    self.assertEqual(rm3[10].strip(), '–')  # timed only for other models and batch sizes
    # A learning rate other than the paper's 0.1 is part of the label, not of the
    # step time; SGD comes first.
    sgd = fixtures.row_for(table, '| 100% | mean (SGD) lr=0.05 |').split('|')
    self.assertEqual(sgd[10].strip(), '1.0')
    self.assertLess(table.index('| 100% | mean (SGD) lr=0.05 |'), table.index('| 100% | rm3 |'))

  def test_unreadable_step_times_are_one_line_and_exit_2(self):
    not_a_table = os.path.join(self.root, 'not_step_times.csv')
    with open(not_a_table, 'w') as f:
      f.write('model,ms\n3x256,1.0\n')
    for path, message in ((os.path.join(self.root, 'nope.csv'), 'cannot be read'),
                          (not_a_table, 'lacks the columns batch_size, hidden, ratio_to_sgd, '
                                        'setting')):
      result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'aggregators.py'),
                               f'--runs={self.aggregator_runs[0]}', f'--step_times={path}',
                               f'--out={self.root}/a.png'],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
      self.assertEqual(result.returncode, 2, result.stderr[-2000:])
      lines = result.stderr.strip().splitlines()
      self.assertLen(lines, 1, result.stderr)
      self.assertStartsWith(lines[0], 'aggregators.py: error: --step_times=')
      self.assertIn(message, lines[0])

  def test_coherence_refuses_runs_without_the_measurements(self):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'coherence.py'),
                             f'--runs={self.runs[1]}', f'--out={self.root}/c.png'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 2)
    self.assertIn('was not run with --coherence_every and --forgetting',
                  result.stderr.strip().splitlines()[-1])


@pytest.mark.slow
class DeadUnitsTest(absltest.TestCase):

  def test_restores_the_run_and_counts_what_it_logged(self):
    # The script rebuilds the training set from the run's config and restores
    # its last checkpoint: its training accuracy must be the one the run
    # logged, and its dead units the logged fractions times the widths.
    data_dir = fixtures.fake_mnist_dir('dead_units', num_train=300)
    run_dir = self.create_tempdir().full_path
    config = fixtures.tiny_config(hidden=(32, 8), noise=0.5, steps=40, data_dir=data_dir,
                                    learning_rate=0.5)
    metrics = train.train_and_evaluate(config, run_dir)
    table = fixtures.run_script('dead_units.py', f'--runs={run_dir}')
    row = fixtures.row_for(table, f'| {run_dir} |').split('|')
    self.assertEqual(int(row[2]), 40)
    self.assertAlmostEqual(float(row[3]), metrics['train/accuracy'], delta=5e-5)
    self.assertEqual(row[4].strip(), '%d of 32, %d of 8' % (
        round(32 * metrics['dead_units/hidden_1']), round(8 * metrics['dead_units/hidden_2'])))
    self.assertAlmostEqual(float(row[5]), metrics['train/most_common_prediction'], delta=5e-4)

  def test_a_run_without_checkpoints_is_one_line_and_exit_2(self):
    run_dir = self.create_tempdir().full_path
    workdir.prepare(run_dir, fixtures.tiny_config(steps=40))
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'dead_units.py'),
                             f'--runs={run_dir}'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stdout, '')
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertIn('has no checkpoint', lines[0])


@pytest.mark.slow
class BadRunsTest(parameterized.TestCase):

  @parameterized.product(script=['figure1.py', 'figure4.py', 'figures_2_3.py', 'coherence.py',
                                 'aggregators.py'],
                         case=['missing', 'empty_glob', 'not_a_run', 'unfinished', 'none',
                               'other_version'])
  def test_bad_runs_are_one_line_and_exit_2(self, script, case):
    root = self.create_tempdir()
    unfinished = root.mkdir('unfinished')
    workdir.prepare(unfinished.full_path, fixtures.tiny_config(steps=40))
    workdir.save_final_metrics(unfinished.full_path, 20, {'train/accuracy': 0.5})
    other_version = root.mkdir('other_version')
    workdir.prepare(other_version.full_path, fixtures.tiny_config(steps=20))
    workdir.save_final_metrics(other_version.full_path, 20, {'train/accuracy': 0.5})
    fixtures.add_unknown_setting(other_version.full_path)
    runs, message = {
        'missing': ([f'--runs={root.full_path}/nope'], 'matches no directory'),
        'empty_glob': ([f'--runs={root.full_path}/x*'], 'matches no directory'),
        'not_a_run': ([f'--runs={root.mkdir("other").full_path}'], 'is not a run directory'),
        'unfinished': ([f'--runs={unfinished.full_path}'], 'has not finished'),
        'none': ([], '--runs is required'),
        'other_version': ([f'--runs={other_version.full_path}'],
                          'holds settings this version of cg_tf does not know (future_setting)'),
    }[case]
    out = (f'--out_dir={root.full_path}' if script == 'figures_2_3.py' else
           f'--out={root.full_path}/f.png')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', script), *runs, out],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertEqual(result.stdout, '')
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertStartsWith(lines[0], f'{script}: error: ')
    self.assertIn(message, lines[0])

  @parameterized.product(
      script_and_flag=[('figure1.py', 'out'), ('figure4.py', 'out'), ('figures_2_3.py', 'out_dir'),
                       ('coherence.py', 'report'), ('aggregators.py', 'out'),
                       ('dead_units.py', 'report'), ('bench_step.py', 'csv')],
      place=['cannot_be_created', 'is_a_directory'])
  def test_unwritable_outputs_are_one_line_and_exit_2_before_any_work(self, script_and_flag,
                                                                       place):
    script, flag = script_and_flag
    root = self.create_tempdir()
    path, message = {
        'cannot_be_created': ('/proc/cg_tf/out', 'cannot be created (No such file or directory)'),
        'is_a_directory': (root.mkdir('a_dir').full_path, 'it is a directory'),
    }[place]
    if place == 'is_a_directory' and flag == 'out_dir':
      path, message = f'{root.full_path}/a_file', 'cannot be created'
      root.create_file('a_file')
    runs = [] if script == 'bench_step.py' else [f'--runs={root.full_path}/no_run']
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', script), *runs,
                             f'--{flag}={path}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertEqual(result.stdout, '')
    lines = result.stderr.strip().splitlines()
    if script == 'bench_step.py':  # it loads TensorFlow, which logs its start, before parsing
      self.assertNotIn('Traceback', result.stderr)
      lines = lines[-1:]
    self.assertLen(lines, 1, result.stderr)
    self.assertStartsWith(lines[0], f'{script}: error: --{flag}={path} cannot be written: ')
    self.assertIn(message, lines[0])

  @parameterized.parameters(
      (['--c=2', '--batch_size=20', '--methods=sgd,trimmed_mean'],
       '--c=2 clips no value a side of a batch of 20'),
      (['--data_dir=/nonexistent/mnist'], '/nonexistent/mnist'))
  def test_bench_refuses_bad_settings_in_one_line(self, bad_flags, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'bench_step.py'),
                             '--model=16', *bad_flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertNotIn('Traceback', result.stderr)
    last = result.stderr.strip().splitlines()[-1]  # after TensorFlow's start-up lines
    self.assertStartsWith(last, 'bench_step.py: error: ')
    self.assertIn(message, last)


if __name__ == '__main__':
  absltest.main()
