"""The `affect-jax` command line: `affect-jax <command> [flags]`, one module per command.

  affect-jax --help                   the commands
  affect-jax <command> --help         a command's flags
  python -m affect_jax <command> ...  the same without the console script

Every command reads absl flags, and the commands that take a config read it with
ml_collections' config_flags (`--config configs/default.py --config.model.dtype=bfloat16`).
Each parse fills a FlagValues of its own, not absl's global FLAGS: command modules
import side by side and a command can run twice in one process (tests, notebooks). The
dispatcher imports a command's module only when that command runs, so listing the
commands imports no JAX. A new command is one entry in COMMANDS pointing at a function
`main(argv) -> exit status` that parses with `parse_flags`; its module ends with
`sys.exit(cli.run_as_script(main))`, so its `python -m` form reports errors the same way.

Errors: an expected error (affect_jax.errors.is_expected: bad data, a bad config, a
missing dataset, checkpoint or file) is printed as one `error: ...` line, exit status 1;
anything else is a bug and keeps its traceback. `--verbose`, anywhere before a `--`
(`affect-jax --verbose train ...`, `affect-jax train ... --verbose`, `python -m
affect_jax.main ... --verbose`), shows the traceback of an expected error too. A command
line that does not parse (an unknown flag, a missing --config file) exits with status 2.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import textwrap
from typing import Callable, Sequence

from absl import flags

PROGRAM = "affect-jax"
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
USAGE_ERROR = 2  # the exit status of a command line that cannot be parsed


@dataclasses.dataclass(frozen=True)
class Command:
  target: str  # "module:function", function(argv without the program) -> exit status
  summary: str


COMMANDS = {
  "train": Command("affect_jax.main:train_main",
                   "train a model (resumes from the workdir's latest checkpoint)"),
  "eval": Command("affect_jax.main:eval_main", "evaluate a checkpoint of a run"),
  "predict": Command("affect_jax.inference.predict:predict_main",
                     "per-frame predictions and ABAW submission files of a run"),
  "tune": Command("affect_jax.inference.predict:tune_main",
                  "tune per-AU thresholds, compare smoothing windows"),
  "faces": Command("affect_jax.inference.faces:main",
                   "detect, align and predict the faces of photos and videos"),
  "validate": Command("affect_jax.inference.submission_validator:validate_main",
                      "check ABAW submission files against a test list"),
  "study": Command("affect_jax.study.runner:main",
                   "train a grid of variants and write the report comparing them"),
  "build": Command("tfds_affwild2.build:main",
                   "build the affwild2 TFDS dataset from an ABAW release folder"),
  "synthetic": Command("tfds_affwild2.synthetic:main",
                       "write a synthetic release in the ABAW layout"),
  "convert": Command("affect_jax.train.init_from:main",
                     "convert torchvision / timm ResNet-18 weights for warm starts"),
  "temporal": Command("affect_jax.temporal.command:main",
                      "a GRU/Transformer over a run's frame embeddings: train, eval, "
                      "predict, compare"),
  "export": Command("affect_jax.video.export:main",
                    "a trained model as a portable jax.export function (StableHLO)"),
  "compile": Command("affect_jax.aot.command:main",
                     "compile the steps ahead of time for TPUs/GPUs: HBM, roofline"),
  "demo": Command("affect_jax.demo:main",
                  "synthetic release -> dataset -> training -> report, on a CPU"),
}


def command_list() -> str:
  width = max(map(len, COMMANDS))
  return "commands:\n" + "\n".join(f"  {name:<{width}}  {command.summary}"
                                   for name, command in COMMANDS.items())


def usage() -> str:
  return (f"usage: {PROGRAM} [{VERBOSE_FLAG}] <command> [flags]   ({PROGRAM} <command> "
          f"--help: its flags; {VERBOSE_FLAG}: tracebacks of expected errors "
          f"too)\n\n{command_list()}")


VERBOSE_FLAG = "--verbose"  # anywhere before a `--`: tracebacks of expected errors too
VERBOSE_HELP = "Show the traceback of an expected error too (a bug always shows it)."


def split_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
  """argv without VERBOSE_FLAG (wherever it is before a `--`: what follows one is
  positional) and whether it was there."""
  arguments = list(argv)
  end = arguments.index("--") if "--" in arguments else len(arguments)
  kept = [arg for arg in arguments[:end] if arg != VERBOSE_FLAG] + arguments[end:]
  return kept, len(kept) != len(arguments)


def run_command(name: str, argv: Sequence[str], verbose: bool = False) -> int:
  """Imports the command's module and runs its function on argv. An expected error
  (errors.is_expected: bad data, config, dataset or checkpoint) becomes one `error:` line
  and exit status 1, its traceback only with `verbose`; any other exception is a bug
  and propagates with its traceback."""
  module_name, function = COMMANDS[name].target.split(":")
  command = getattr(importlib.import_module(module_name), function)
  return run_reporting_errors(lambda: command(list(argv)), verbose)


def run_as_script(command: Callable[[list[str]], int | None],
                  argv: Sequence[str] | None = None) -> int:
  """A command module's `python -m` entry point: command(argv) (default sys.argv[1:])
  with VERBOSE_FLAG taken out, its errors reported as the dispatcher reports them."""
  argv, verbose = split_verbose(sys.argv[1:] if argv is None else argv)
  return run_reporting_errors(lambda: command(argv), verbose)


def run_reporting_errors(command: Callable[[], int | None], verbose: bool = False) -> int:
  """command()'s exit status; an expected error (errors.is_expected) printed as `error: <message>` (exit
  status errors.EXIT_STATUS) unless verbose, when it propagates with its traceback."""
  from affect_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    return int(command() or 0)
  except Exception as error:  # pylint: disable=broad-except  # sorted by is_expected
    if verbose or not errors.is_expected(error):
      raise
    print(f"error: {error}", file=sys.stderr)
    return errors.EXIT_STATUS


def main(argv: Sequence[str] | None = None) -> int:
  """`affect-jax <command> [flags]`: the console script and `python -m affect_jax`."""
  argv, verbose = split_verbose(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in HELP_FLAGS:
    print(usage(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else USAGE_ERROR
  if argv[0] not in COMMANDS:
    print(f"{PROGRAM}: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    return USAGE_ERROR
  return run_command(argv[0], argv[1:], verbose)


# ----------------------------------------------------------------------------------
# Parsing one command's flags.
# ----------------------------------------------------------------------------------


def wants_help(argv: Sequence[str]) -> bool:
  arguments = list(argv)
  if "--" in arguments:  # what follows is positional, whatever it looks like
    arguments = arguments[:arguments.index("--")]
  return any(arg in HELP_FLAGS for arg in arguments)


def describe_flag(flag) -> str:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  default = flag.default
  if isinstance(default, bool):
    default = str(default).lower()
  elif isinstance(default, (list, tuple)):
    default = ",".join(map(str, default))
  shown = "" if default in (None, "") else f" (default: {default})"
  # absl appends its own "; repeat this option ..." to a multi flag's help.
  text = flag.help.replace(".;", ";")
  return textwrap.fill(f"{name}: {text}{shown}", width=88,
                       initial_indent="  ", subsequent_indent="      ")


def help_text(doc: str, flag_values: flags.FlagValues) -> str:
  listed = [describe_flag(flag_values[name]) for name in flag_values
            if not name.startswith("config.")  # --config.x overrides: the config's own
            and not flag_values[name].help.startswith("Alias for --")]
  listed.append(textwrap.fill(f"{VERBOSE_FLAG}: {VERBOSE_HELP}", width=88,
                              initial_indent="  ", subsequent_indent="      "))
  return f"{textwrap.dedent(doc).strip()}\n\nflags:\n" + "\n".join(listed)


def config_file_problem(flag_values: flags.FlagValues) -> str | None:
  """Why the given --config file did not load, or None. config_flags keeps a file that
  does not load as a placeholder raising OSError at the config's first use, which
  would be a traceback deep inside the command."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if not flag_values["config"].present:
    return None
  try:
    _ = flag_values.config.get  # the placeholder raises its load error here
  except OSError as error:
    filename = config_flags.get_config_filename(flag_values["config"])
    path = filename.split(":", 1)[0]
    if not os.path.isfile(path):
      return f"--config {filename}: no such file"
    reason = " ".join(str(error.__cause__ or error).split())
    return f"--config {filename}: cannot load it: {reason}"
  return None


def parse_flags(argv: Sequence[str] | None,
                define_flags: Callable[[flags.FlagValues], None], doc: str, *,
                config: str | None = None, config_required: bool = False,
                positional: Sequence[str] = ()) -> tuple[flags.FlagValues, list[str]]:
  """One command's flags from argv (without the program's name; default sys.argv[1:]):
  its FlagValues and its positional arguments, named by `positional` (their count is
  checked). `config`, the help of a `--config FILE` flag (ml_collections config_flags,
  `--config.x=value` overrides, locked). `--help` prints `doc` and the flags and exits
  with status 0; a command line that does not parse exits with status 2 after saying
  why."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  if config is not None:
    # config_flags finds the `--config.x` overrides in the argv it is given, not sys.argv.
    config_flags.DEFINE_config_file("config", None, config, flag_values=flag_values,
                                    lock_config=True, sys_argv=["", *argv])
    if config_required:
      flags.mark_flag_as_required("config", flag_values=flag_values)
  if wants_help(argv):
    print(help_text(doc, flag_values))
    raise SystemExit(0)
  try:
    rest = flag_values(["", *argv])[1:]
    if len(rest) != len(positional):
      expected = " ".join(positional) or "no positional argument"
      raise flags.Error(f"expected {expected}, got {rest or 'none'}")
  except (flags.Error, OSError) as error:  # an unknown flag or value, a missing file
    print(f"error: {error}\n(--help lists the flags)", file=sys.stderr)
    raise SystemExit(USAGE_ERROR) from None
  except (KeyError, AttributeError) as error:  # config_flags: --config.x of no field x
    field = str(error).strip("\"'")
    print(f"error: the config has no field {field!r}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR) from None
  problem = config_file_problem(flag_values) if config is not None else None
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)
  return flag_values, rest
