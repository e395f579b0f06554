"""Errors a user can act on. Library code raises these; the CLIs print one line and exit."""


class SetupError(RuntimeError):
  """Something a run needs is missing or does not fit (dataset, SAM weights, checkpoint)."""


class DataMissingError(SetupError, FileNotFoundError):
  """The prepared dataset is not there."""


class SamWeightsMissingError(SetupError, FileNotFoundError):
  """The converted SAM checkpoint is not there."""


class SamWeightsChangedError(SetupError):
  """The converted SAM checkpoint differs from the one the workdir was trained with."""


class NoCheckpointError(SetupError, FileNotFoundError):
  """The workdir has no usable checkpoint for what was asked."""


class WorkdirError(SetupError):
  """The workdir cannot be used: a file, not writable (a usage error: exit status 2)."""


class ConfigValueError(ValueError):
  """A config value outside its meaning (a usage error: exit status 2)."""
