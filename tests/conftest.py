"""pytest runs absl TestCases without absl.app, so mark the flags parsed."""

import os

from absl import flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
flags.FLAGS.mark_as_parsed()
