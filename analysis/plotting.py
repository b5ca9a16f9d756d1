"""Small matplotlib helpers shared by the figure scripts."""

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


def save(fig, out: str, dpi: int = 110) -> None:
  """Writes `out` (PNG) and a PDF beside it, creating the directory; closes the figure."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=dpi)
  fig.savefig(os.path.splitext(out)[0] + '.pdf')
  plt.close(fig)
