"""The errors a user can fix: a config value, a path, a dataset, a checkpoint, a weights file.

`main` prints these as one paragraph with no traceback and exits with `EXIT_BAD_INPUT`; anything else is
a bug and keeps its traceback. Each subclass is also a ValueError, so callers that catch bad values
keep working.
"""

EXIT_BAD_INPUT = 2  # bad user input: the message names the field, file or record and what is valid
EXIT_STOPPED = 3  # the run stopped itself (e.g. too many consecutive non-finite steps); state is saved
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: preempted (SIGTERM / preemption notice) after a complete save; resubmit


class UserError(ValueError):
  """Bad input that the user can fix; the message says what is wrong and what is valid."""


class ConfigError(UserError):
  """A config value that is missing, unknown or out of range."""
