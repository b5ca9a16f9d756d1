"""The one exception type that means "the user asked for something we cannot do"."""


class UserInputError(ValueError):
  """Bad configuration, data directory or log directory.

  `run.py` prints the message as a single line and exits with status 2, so the
  message must say what is wrong and how to fix it.
  """


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite.

  `run.py` prints the message as a single line and exits with status 1; the
  message names the step, the value, what to try, and what was kept.
  """
