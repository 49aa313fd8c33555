"""Errors a user can fix: bad data, a bad config or flag, a missing dataset or checkpoint.

The command line prints such an error as one `error: ...` line and exits non-zero;
anything else is a bug and keeps its traceback. `affect-jax --verbose <command>` shows
the traceback of an expected error too. InputError is a ValueError, so code that already
catches ValueError around a read keeps working.
"""


class InputError(ValueError):
  """Something the user gave (a file, a setting, a path) is wrong; the message says what
  and where (file and line where there is one)."""


EXIT_STATUS = 1  # an expected error; 2 is a command line that does not parse
