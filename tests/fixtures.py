"""What several test modules share: tiny datasets and configs, and finished runs with planted numbers."""

import os
from typing import Dict, Mapping, Optional

import numpy as np
import tensorflow as tf

from cg_tf import workdir
from cg_tf.config import Config


def write_run(run_dir: str, config: Config, scalars: Mapping[str, Mapping[int, float]],
              examples: Optional[Dict[str, np.ndarray]] = None,
              decomposition: Optional[Dict[str, np.ndarray]] = None) -> str:
  """A finished run directory holding exactly the numbers given, written as a run writes them.

  The same writers as cg_tf/train.py: workdir.prepare (config.json), a
  TensorBoard file writer (the scalars, step by step), workdir.save_examples,
  workdir.save_measurements and workdir.save_final_metrics, at config.steps,
  so the analysis scripts read the directory as a finished run.

  Args:
    run_dir: where to write.
    config: the run's settings; its `steps` is the final step.
    scalars: tag -> {step: value}.
    examples: examples.npz's arrays, if any.
    decomposition: decomposition.npz's arrays, if any.

  Returns:
    run_dir.
  """
  workdir.prepare(run_dir, config)
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default():
    for tag, curve in scalars.items():
      for step, value in sorted(curve.items()):
        tf.summary.scalar(tag, value, step=step)
  writer.close()
  if examples is not None:
    workdir.save_examples(run_dir, examples)
  if decomposition is not None:
    workdir.save_measurements(run_dir, workdir.DECOMPOSITION_FILE, decomposition)
  final = {tag: float(curve[max(curve)]) for tag, curve in scalars.items()}
  workdir.save_final_metrics(run_dir, config.steps, final)
  return run_dir


def examples_record(corrupt: np.ndarray, first_learned_step: np.ndarray) -> Dict[str, np.ndarray]:
  """examples.npz's arrays for examples with the given corrupt mask and first-learned steps."""
  n = len(corrupt)
  labels = np.arange(n, dtype=np.int32) % 10
  return {'label': labels, 'train_label': np.where(corrupt, (labels + 1) % 10, labels),
          'corrupt': np.asarray(corrupt, bool), 'subset_index': np.arange(n),
          'first_learned_step': np.asarray(first_learned_step, np.int64),
          'learned_since_step': np.asarray(first_learned_step, np.int64)}


def decomposition_record(steps, f_pristine, corrupt: np.ndarray,
                         sampled_offset: float = 0.0) -> Dict[str, np.ndarray]:
  """decomposition.npz's arrays with the given f^p per step and world, <g, g> = 1.

  Args:
    steps: [T] measurement steps.
    f_pristine: [T, worlds]: f^p of the actual designation (world 0) and of
      the null worlds; f^c = 1 - f^p.
    corrupt: [n] the actual corrupt mask (the null worlds get its reverse).
    sampled_offset: the sampled estimator's f^p is the exact one plus this.
  """
  f_pristine = np.asarray(f_pristine, np.float64)
  inner = np.stack([f_pristine, 1.0 - f_pristine], axis=-1)
  sampled = np.stack([f_pristine + sampled_offset, 1.0 - f_pristine - sampled_offset], axis=-1)
  worlds = f_pristine.shape[1]
  designations = np.stack([corrupt] + [corrupt[::-1]] * (worlds - 1))
  return {'step': np.asarray(steps), 'inner': inner, 'sampled_inner': sampled,
          'seconds': np.full(len(steps), 0.5), 'corrupt': designations}


def run_path(out: str, name: str) -> str:
  return os.path.join(out, 'runs', name)
