"""Errors a user can fix: bad data, a bad config or flag, a missing dataset or checkpoint.

The command line prints such an error as one `error: ...` line and exits non-zero;
anything else is a bug and keeps its traceback. `affect-jax --verbose <command>` shows
the traceback of an expected error too. Both classes are ValueErrors, so code that
already catches ValueError around a read keeps working.
"""
import sys

EXIT_STATUS = 1  # an expected error; 2 is a command line that does not parse


class InputError(ValueError):
  """Something the user gave (a file, a setting, a path, a checkpoint) is wrong; the
  message says what and where (file and line where there is one)."""


def is_expected(error: BaseException) -> bool:
  """Whether `error` is one a user can fix: an InputError, or tfds_affwild2's
  ReleaseError (that package imports nothing from this one, so it has its own class)."""
  if isinstance(error, InputError):
    return True
  release_errors = sys.modules.get("tfds_affwild2.errors")  # raised only once imported
  return release_errors is not None and isinstance(error, release_errors.ReleaseError)
