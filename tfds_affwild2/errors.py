"""The error of a release or dataset that the user can fix (a malformed file, a missing
folder, a split that leaks): the command line prints it as one `error:` line."""


class ReleaseError(ValueError):
  """The release on disk, or the dataset built from it, is wrong; the message names the
  file (and line) or folder."""


class MissingReleasePartError(ReleaseError, FileNotFoundError):
  """A folder or file the build needs is absent (the release itself, its image folder,
  its annotations). Also a FileNotFoundError, as it was before it became a ReleaseError."""
