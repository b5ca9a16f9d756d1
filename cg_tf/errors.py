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


class RunInterrupted(RuntimeError):
  """The run was asked to stop (SIGTERM from a preempted VM, Ctrl-C) and saved a checkpoint.

  `run.py` prints the message as a single line and exits with status 128 + the
  signal number, as a shell does for a process the signal ended.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class WriteFailed(RuntimeError):
  """A file of the run could not be written (disk full, permission lost, bucket gone).

  `run.py` prints the message (step, file, last good checkpoint) as a single
  line and exits with status 1.
  """
