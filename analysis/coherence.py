"""Coherence measured directly, from runs made with --coherence_every and --forgetting.

  python analysis/coherence.py --runs=results/coherence/runs/coherence/noise* \
      --out=docs/coherence.png --report=docs/coherence_findings.md

Draws, one column per noise level: (top) the m-coherence of the whole
training set and of its pristine and corrupt parts over training; (bottom)
the histogram of forgetting events per example, pristine against corrupt.
Prints (and with --report writes) a markdown table of the findings: early
m-coherence, forgetting, the rank correlation between each example's
coherence at step 0 and the step it is first learned, GSNR, stiffness and
what each measurement cost. Seeds of one noise level are averaged.
"""

import os
import sys

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pandas as pd  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import plotting  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories made with --coherence_every and --forgetting: '
                    'one per noise level and seed.')
  cli.define_output('out', 'coherence.png', 'Output PNG; a PDF is written beside it.')
  cli.define_output('report', None, 'Also write the findings table to this markdown file.')


# "Early in training": the steps over which the largest m-coherence is taken.
EARLY_STEPS = 100
GROUPS = ('whole', 'pristine', 'corrupt')


def load(run_dir):
  """(config, coherence record, examples record, scalars) of one run; exits if it lacks them."""
  record = workdir.read_measurements(run_dir, workdir.COHERENCE_FILE)
  examples = workdir.read_examples(run_dir)
  if record is None or 'forgetting_events' not in examples:
    cli.fail(f'--runs: {run_dir} was not run with --coherence_every and --forgetting '
             '(flags/coherence_cpu.cfg)')
  return workdir.read_config(run_dir), record, examples, workdir.read_scalars(run_dir)


def rank_correlation(x, y):
  """Spearman's rho: the Pearson correlation of the ranks (ties get their mean rank)."""
  ranks = pd.DataFrame({'x': x, 'y': y}).rank()
  return float(np.corrcoef(ranks['x'], ranks['y'])[0, 1])


def findings(config, record, examples, scalars):
  """{quantity: value} for one run."""
  steps, m_coherence = record['step'], record['m_coherence'][:, :, -1]
  early = steps <= EARLY_STEPS
  corrupt = examples['corrupt']
  first = examples['first_learned_step'].astype(np.float64)
  first[first < 0] = np.inf  # never learned: after every learned example
  out = {'examples': len(corrupt), 'm-coherence at step 0': m_coherence[0, 0],
         f'largest m-coherence, steps 1-{EARLY_STEPS}': np.nanmax(m_coherence[early & (steps > 0),
                                                                              0]),
         'm-coherence at the end': m_coherence[-1, 0]}
  for g, group in ((1, 'pristine'), (2, 'corrupt')):
    if not np.isnan(m_coherence[:, g]).all():
      out[f'largest {group} m-coherence, steps 1-{EARLY_STEPS}'] = np.nanmax(
          m_coherence[early & (steps > 0), g])
  events = examples['forgetting_events']
  for name, mask in (('pristine', ~corrupt), ('corrupt', corrupt)):
    if mask.any():
      out[f'forgetting events per {name} example'] = events[mask].mean()
      out[f'{name} examples forgotten at least once'] = (events[mask] > 0).mean()
  out['rank correlation of c_e at step 0 with first-learned step'] = rank_correlation(
      record['example_coherence'], first)
  for name, mask in (('pristine', ~corrupt), ('corrupt', corrupt)):
    if 0 < mask.sum() < len(mask):
      out[f'... within {name} examples'] = rank_correlation(record['example_coherence'][mask],
                                                            first[mask])
  out['mean c_e at step 0, pristine'] = record['example_coherence'][~corrupt].mean() if (
      ~corrupt).any() else np.nan
  out['mean c_e at step 0, corrupt'] = record['example_coherence'][corrupt].mean() if (
      corrupt.any()) else np.nan
  out['median GSNR, first layer, step 0'] = record['gsnr_median'][0, 0]
  out['median GSNR, first layer, end'] = record['gsnr_median'][-1, 0]
  if 'stiffness' in record:
    matrix = record['stiffness'][-1]
    out['stiffness at the end, same class'] = np.nanmean(np.diag(matrix))
    out['stiffness at the end, other classes'] = np.nanmean(matrix[~np.eye(10, dtype=bool)])
  out['final train accuracy'] = scalars['train/accuracy'].dropna().iloc[-1]
  out['seconds per coherence measurement'] = record['seconds'].mean()
  if 'stiffness_seconds' in record:
    out['seconds per stiffness measurement'] = record['stiffness_seconds'].mean()
  out['training steps per second (with forgetting)'] = scalars['steps_per_second'].dropna().median()
  return out


def draw(by_noise, out):
  noises = sorted(by_noise)
  fig, axes = plt.subplots(2, len(noises), figsize=(3.4 * len(noises), 6.2), squeeze=False)
  colors = {'whole': 'black', 'pristine': 'tab:blue', 'corrupt': 'tab:red'}
  for column, noise in enumerate(noises):
    runs = by_noise[noise]
    ax = axes[0, column]
    for g, group in enumerate(GROUPS):
      curves = [pd.Series(record['m_coherence'][:, g, -1], index=record['step'])
                for _, record, _, _ in runs]
      if all(curve.isna().all() for curve in curves):
        continue
      plotting.plot_mean_band(ax, curves, color=colors[group], label=group)
    ax.set_xscale('symlog', linthresh=1)
    ax.set_yscale('log')
    ax.set_title(f'{noise:.0%} noise')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    ax = axes[1, column]
    events = [np.concatenate([examples['forgetting_events'][mask(examples['corrupt'])]
                              for _, _, examples, _ in runs]) for mask in (np.logical_not,
                                                                         lambda c: c)]
    top = max(int(max((e.max() for e in events if e.size), default=0)), 1)
    bins = np.arange(top + 2) - 0.5
    for values, group in zip(events, ('pristine', 'corrupt')):
      if values.size:
        ax.hist(values, bins=bins, density=True, histtype='step', color=colors[group],
                label=f'{group} ({values.size})')
    ax.set_yscale('log')
    ax.legend(fontsize='small')
  plotting.label_grid(axes, [f'{n:.0%} noise' for n in noises],
                      ['m-coherence', 'share of examples'], xlabel='training step')
  for ax in axes[0]:
    ax.set_xlabel('training step')
  for ax in axes[1]:
    ax.set_xlabel('forgetting events per example')
  plotting.save(fig, out)


def as_markdown(by_noise):
  noises = sorted(by_noise)
  tables = {n: pd.DataFrame([findings(*run) for run in by_noise[n]]).mean() for n in noises}
  names = list(dict.fromkeys(k for n in noises for k in tables[n].index))
  lines = ['| quantity | ' + ' | '.join(f'{n:.0%} noise' for n in noises) + ' |',
           '|---|' + '---|' * len(noises)]
  for name in names:
    cells = []
    for n in noises:
      value = tables[n].get(name, np.nan)
      cells.append('–' if np.isnan(value) else f'{value:.0f}' if name == 'examples' else
                   f'{value:.3g}')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  by_noise = {}
  for run_dir in cli.run_directories(FLAGS.runs):
    run = load(run_dir)
    by_noise.setdefault(run[0].noise, []).append(run)
  draw(by_noise, FLAGS.out)
  table = as_markdown(by_noise)
  cli.print_report(table, FLAGS.report)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
