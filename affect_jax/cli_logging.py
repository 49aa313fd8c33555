"""Console logging for the commands: our INFO lines, without the libraries' chatter."""
import logging

# Orbax logs every phase of every save at INFO through absl.
_CHATTY = ("orbax", "absl/logging", "tensorflow_datasets", "grain", "xla_bridge")
# Periodic saves between evaluations carry no scores, by design.
_EXPECTED_WARNINGS = ("did not provide metrics",)
FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


class _DropLibraryInfo(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if any(text in record.getMessage() for text in _EXPECTED_WARNINGS):
      return False
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in _CHATTY)


def quiet_library_logs() -> None:
  """Keeps library warnings and errors, drops their INFO lines, on every handler."""
  root = logging.getLogger()
  for handler in root.handlers:
    handler.addFilter(_DropLibraryInfo())
  logging.getLogger("absl").addFilter(_DropLibraryInfo())


def start_console_logging() -> None:
  """INFO and above on stderr, one line each, library INFO lines dropped. Best called
  by a command before it imports the libraries: importing Orbax logs through absl,
  which gives a root logger that has no handler a plain one (Python's own format);
  such a handler gets our format here."""
  logging.basicConfig(level=logging.INFO, format=FORMAT)
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    if type(handler) is logging.StreamHandler:  # pylint: disable=unidiomatic-typecheck
      handler.setFormatter(logging.Formatter(FORMAT))  # not a subclass: pytest's, absl's
  quiet_library_logs()
