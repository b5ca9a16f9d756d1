"""Helpers shared by the figure scripts: grids, saving, and seeds drawn as mean and band.

Runs that differ only in their seeds are drawn as one curve, the mean over
seeds, with a shaded band from the lowest to the highest seed.
"""

import os
from typing import Sequence


def label_grid(axes, column_titles: Sequence[str], row_labels: Sequence[str],
               xlabel: str = 'training step') -> None:
  """Titles the top row, labels the left column and the bottom row of a 2-D axes grid."""
  for i, row in enumerate(axes):
    for j, ax in enumerate(row):
      if i == 0:
        ax.set_title(column_titles[j])
      if j == 0:
        ax.set_ylabel(row_labels[i])
      if i == len(axes) - 1:
        ax.set_xlabel(xlabel)


def save(fig, out: str, dpi: int = 110, rect=(0, 0, 1, 1)) -> None:
  """Writes `out` (PNG) and a PDF beside it, creating the directory; closes the figure.

  `rect` is the part of the figure the axes fill (tight_layout's), leaving room
  for a figure legend.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout(rect=rect)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=dpi)
  # No creation date: a figure redrawn from the same runs is the same file.
  fig.savefig(os.path.splitext(out)[0] + '.pdf', metadata={'CreationDate': None})
  plt.close(fig)


def mean_over_seeds(frames):
  """The mean of DataFrames or Series indexed by step (one per seed), step by step."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  return pd.concat(frames).groupby(level=0).mean()


def plot_mean_band(ax, curves, **plot_kwargs):
  """Plots the mean of `curves` and, for more than one, their min-max band.

  Args:
    ax: a matplotlib Axes.
    curves: pandas Series indexed by step, one per seed; steps missing from any
      curve are left out, so seeds logged on the same schedule line up exactly.
    **plot_kwargs: passed to `ax.plot` (color, label, linestyle, ...).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = pd.concat([curve.dropna() for curve in curves], axis=1, join='inner')
  line, = ax.plot(frame.index, frame.mean(axis=1), **plot_kwargs)
  if frame.shape[1] > 1:
    ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=line.get_color(),
                    alpha=0.2, linewidth=0)
  return line
