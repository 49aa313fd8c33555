"""The `affect-jax <command>` command line: the dispatcher, each command's flags and help,
the `python -m` forms, and a training run that imports no CPU-only module."""
import importlib
import json
import os
import subprocess
import sys
import tomllib

import pytest

from affect_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Options each command's --help must name.
MAIN_OPTIONS = {
  "train": ("--config", "--workdir", "--[no]distributed", "--coordinator_address"),
  "eval": ("--config", "--workdir", "--step", "--split", "--[no]distributed"),
  "predict": ("--workdir", "--source", "--out", "--formats", "--image_root", "--config"),
  "tune": ("--workdir", "--smooth_windows", "--split", "--config"),
  "faces": ("--workdir", "--export", "--runtime", "--input", "--out", "--align",
            "--min_score"),
  "validate": ("--format", "--test_list", "--image_root", "--frame_counts"),
  "study": ("--config", "--study_dir", "--variants", "--shard_index", "--[no]report_only",
            "--[no]report"),
  "build": ("--manual_dir", "--data_dir", "--config", "--layout"),
  "synthetic": ("--out", "--seed", "--generation", "--num_videos"),
  "convert": ("--input", "--output"),
  "compile": ("--config", "--topology", "--batch_size", "--dtype", "--out"),
  "demo": ("--workdir", "--steps", "--num_videos"),
  "export": ("--workdir", "--out", "--[no]onnx"),
  "temporal": ("--config", "--workdir", "--mode", "--source"),
}


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=kwargs.pop("timeout", 120), **kwargs)


def test_help_lists_every_command_without_importing_jax():
  result = run_python(
      "import sys; from affect_jax import cli; status = cli.main(['--help']); "
      "print(sorted(m for m in ('jax', 'flax', 'tensorflow_datasets') "
      "if m in sys.modules)); sys.exit(status)")
  assert result.returncode == 0, result.stderr
  listing, imported = result.stdout.rsplit("\n", 2)[:2]
  assert imported == "[]"
  for name, command in cli.COMMANDS.items():
    assert f"  {name}" in listing and command.summary in listing


def test_an_unknown_command_exits_non_zero_with_the_list(capsys):
  assert cli.main(["tarin"]) == cli.USAGE_ERROR
  printed = capsys.readouterr().err
  assert "unknown command 'tarin'" in printed
  assert all(f"  {name}" in printed for name in cli.COMMANDS)
  assert cli.main([]) == cli.USAGE_ERROR  # no command: the list, and a failure
  assert "commands:" in capsys.readouterr().err


def test_every_command_is_listed_here_and_resolves_to_a_function():
  assert set(MAIN_OPTIONS) == set(cli.COMMANDS)
  for command in cli.COMMANDS.values():
    module, function = command.target.split(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("name", sorted(MAIN_OPTIONS))
def test_each_command_help_exits_0_and_names_its_options(name, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([name, "--help"])
  assert exit_info.value.code == 0
  printed = capsys.readouterr().out
  assert f"affect-jax {name}" in printed  # its usage examples
  for option in MAIN_OPTIONS[name]:
    assert f"\n  {option}:" in printed, option


def test_a_command_line_that_does_not_parse_says_why(capsys, tmp_path):
  tiny = os.path.join(REPO, "configs", "tiny.py")
  cases = [
      (["train", "--workdir", str(tmp_path)], "--config must have a value"),
      (["train", "--config", tiny, "--workdir", str(tmp_path), "--no_such_flag=1"],
       "no_such_flag"),
      (["train", "--config", tiny, "--workdir", str(tmp_path),
        "--config.no_such_field=1"], "no_such_field"),
      (["eval", "--config", tiny, "--workdir", str(tmp_path), "--step=three"],
       "three"),
      (["validate", "--format", "mtl", "--test_list", "list.txt"], "SUBMISSION_DIR"),
      (["synthetic", "--out", str(tmp_path), "--generation", "abaw9"], "abaw9"),
      (["demo", "--workdir", str(tmp_path), "--frames_per_video", "4"],
       "--frames_per_video=4"),
  ]
  for argv, reason in cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.main(argv)
    assert exit_info.value.code == cli.USAGE_ERROR, argv
    assert reason in capsys.readouterr().err, argv


def test_the_python_m_forms_run_the_same_commands():
  modules = ["affect_jax", "affect_jax.main", "affect_jax.demo",
             "affect_jax.inference.predict", "affect_jax.inference.faces",
             "affect_jax.inference.submission_validator", "affect_jax.study.runner",
             "affect_jax.train.init_from", "affect_jax.video.export",
             "affect_jax.temporal.command", "tfds_affwild2.build",
             "tfds_affwild2.synthetic"]
  code = ("import runpy, sys\n"
          f"for module in {modules!r}:\n"
          "  sys.argv = [module, '--help']\n"
          "  try:\n"
          "    runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
          "    status = None\n"
          "  except SystemExit as exit_:\n"
          "    status = exit_.code\n"
          "  print('STATUS', module, status, flush=True)\n")
  result = run_python(code)
  assert result.returncode == 0, result.stderr[-3000:]
  statuses = [line.split()[1:] for line in result.stdout.splitlines()
              if line.startswith("STATUS ")]
  assert statuses == [[module, "0"] for module in modules]
  assert "python -m affect_jax.main" in result.stdout  # --mode train / eval
  assert "--mode" in result.stdout


def test_the_console_script_is_the_dispatcher():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  module, function = scripts["affect-jax"].split(":")
  assert getattr(importlib.import_module(module), function) is cli.main


# Runs the console script's function; at exit prints the affect_jax.cpu modules loaded.
PROBE = """
import atexit, json, sys
from affect_jax import cli
atexit.register(lambda: print("CPU_MODULES", json.dumps(sorted(
    m for m in sys.modules if m == "affect_jax.cpu" or m.startswith("affect_jax.cpu.")))))
sys.exit(cli.main(sys.argv[1:]))
"""


def run_command(argv, workdir) -> tuple[list[str], str]:
  result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [x for x in result.stdout.splitlines() if x.startswith("CPU_MODULES ")][-1]
  return json.loads(line.split(" ", 1)[1]), result.stderr


def test_train_with_the_xla_implementation_imports_no_cpu_module(built_union, tmp_path):
  _, data_dir = built_union
  workdir = str(tmp_path / "run")
  common = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", workdir,
            f"--config.dataset.data_dir={data_dir}", "--config.num_train_steps=2",
            "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
            "--config.log_every_steps=1"]
  loaded, _ = run_command(["train", *common, "--config.model.implementation=xla"],
                          workdir)
  assert loaded == []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [2]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  # The same probe sees the CPU package where the CPU implementation is chosen.
  loaded, log = run_command(["eval", *common, "--config.model.implementation=cpu",
                             "--config.allow_config_change=True"], workdir)
  assert "affect_jax.cpu.layers" in loaded and "affect_jax.cpu.host_memory" in loaded
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert json.loads(f.readlines()[-1])["mode"] == "eval"
