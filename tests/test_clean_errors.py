"""Expected errors reach the user as one `error:` line and exit status 1, from every
command and from the commands' `python -m` forms; `--verbose` shows their traceback;
a bug keeps its traceback. Each case is a mistake a user makes (a config, dataset,
workdir, checkpoint or file that is not there) and fails before any training."""
import io
import logging
import os
import subprocess
import sys

import pytest

from affect_jax import cli, cli_logging, errors
from affect_jax.data import augment, pipeline
from affect_jax.train import init_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def error_line(status: int, stderr: str) -> str:
  """The one `error:` line of a failed command; asserts the rest of the contract."""
  assert status == errors.EXIT_STATUS, stderr
  assert "Traceback" not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr
  return lines[0]


def run_command(argv, capsys) -> str:
  """cli.main(argv)'s one error line."""
  status = cli.main(argv)
  return error_line(status, capsys.readouterr().err)


def predict_argv(workdir, *extra):
  return ["predict", "--config", TINY, "--workdir", str(workdir), "--out",
          str(workdir / "out"), *extra]


def test_a_config_file_that_does_not_exist_is_named_in_one_line(tmp_path, capsys):
  missing = str(tmp_path / "no_such_config.py")
  for argv in (["train", "--config", missing, "--workdir", str(tmp_path)],
               ["study", "--config", f"{missing}:tiny", "--study_dir", str(tmp_path)]):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(argv)
    assert exit_info.value.code == cli.USAGE_ERROR
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "Configuration is not available" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: --config {missing}")
    assert "no such file" in stderr


def test_a_config_file_that_fails_to_load_says_why(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("raise OSError('the settings server is down')\n")
  with pytest.raises(SystemExit):
    cli.main(["train", "--config", str(broken), "--workdir", str(tmp_path)])
  assert (f"error: --config {broken}: cannot load it: the settings server is down"
          in capsys.readouterr().err)


def test_predict_on_a_dataset_that_is_not_built_says_so(tmp_path, capsys):
  empty = tmp_path / "empty_data_dir"
  empty.mkdir()
  line = run_command(predict_argv(tmp_path, "--source", "tfds:validation",
                                  f"--config.dataset.data_dir={empty}"), capsys)
  assert line.startswith(f"error: dataset affwild2/union is not built in {empty} "
                         "(config.dataset.data_dir)"), line
  assert "affect-jax build" in line and "TFRECORD" not in line


def test_predict_on_a_split_the_dataset_lacks_names_its_splits(built_union, tmp_path,
                                                              capsys):
  line = run_command(predict_argv(tmp_path, "--source", "tfds:valdiation",
                                  f"--config.dataset.data_dir={built_union[1]}"), capsys)
  assert "has no split 'valdiation'; its splits: train, validation, test" in line


def test_predict_sources_and_workdirs_that_do_not_exist(tmp_path, capsys):
  missing = tmp_path / "missing"
  cases = [
      (predict_argv(tmp_path, "--source", f"folder:{missing}"),
       f"error: --source folder:{missing}: the folder does not exist"),
      (predict_argv(tmp_path, "--source", f"list:{missing}.txt", "--image_root",
                    str(tmp_path)),
       f"error: --source list:{missing}.txt: no such file"),
      (predict_argv(tmp_path, "--source", "frames:x"),
       "error: --source 'frames:x': expected tfds:SPLIT, folder:PATH or list:PATH"),
      (["predict", "--workdir", str(missing), "--out", str(tmp_path), "--source",
        "tfds:test"], f"error: workdir {missing} does not exist"),
      (["predict", "--workdir", str(tmp_path), "--out", str(tmp_path), "--source",
        "tfds:test"],
       f"error: {tmp_path}/config.json does not exist: pass --config"),
  ]
  for argv, expected in cases:
    assert run_command(argv, capsys).startswith(expected), argv


def test_train_on_a_dataset_that_is_not_built_says_so(tmp_path, capsys):
  line = run_command(["train", "--config", TINY, "--workdir", str(tmp_path / "run"),
                      f"--config.dataset.data_dir={tmp_path / 'nothing_here'}"], capsys)
  assert "affwild2/union is not built" in line and "affect-jax build" in line, line


def test_eval_and_predict_of_a_workdir_without_checkpoints_say_so(built_union,
                                                                 tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  data_dir = f"--config.dataset.data_dir={built_union[1]}"
  line = run_command(["eval", "--config", TINY, "--workdir", str(workdir), data_dir],
                     capsys)
  assert "no checkpoint" in line and str(workdir) in line, line
  line = run_command(predict_argv(workdir, "--source", "tfds:validation", data_dir),
                     capsys)
  assert "no checkpoint" in line and str(workdir) in line, line


def test_convert_and_demo_name_the_file(tmp_path, capsys):
  missing = tmp_path / "resnet18.pth"
  assert run_command(["convert", "--input", str(missing), "--output",
                      str(tmp_path / "weights")], capsys) == (
      f"error: --input {missing}: no such file")
  a_file = tmp_path / "demo_workdir"
  a_file.write_text("")
  assert run_command(["demo", "--workdir", str(a_file)], capsys) == (
      f"error: --workdir {a_file} is a file, not a folder")


def test_a_study_report_of_a_study_dir_that_does_not_exist_is_refused(tmp_path,
                                                                     capsys):
  missing = tmp_path / "no_study"
  assert run_command(["study", "--config", os.path.join(REPO, "configs", "study.py"),
                      "--study_dir", str(missing), "--report_only"], capsys) == (
      f"error: --study_dir {missing} does not exist: nothing to report")
  assert not missing.exists()


def test_refusals_name_the_config_key_to_change(tmp_path):
  with pytest.raises(errors.InputError, match=f"config.init_from.path: {tmp_path} holds "
                     "no converted weights"):
    init_from.load_init_variables(str(tmp_path))  # a folder, but nothing Orbax wrote
  with pytest.raises(errors.InputError, match="config.init_from.parts must be one of"):
    init_from.merge_variables({}, {}, "heads")
  with pytest.raises(errors.InputError, match="3 records, fewer than one batch of "
                     "config.input.batch_size 8"):
    pipeline.train_dataset([{}] * 3, global_batch_size=8, seed=0,
                           augment=augment.AugmentConfig())


def test_verbose_anywhere_before_a_double_dash_shows_the_traceback(tmp_path):
  argv = predict_argv(tmp_path, "--source", f"folder:{tmp_path / 'missing'}")
  for verbose_argv in (["--verbose", *argv], [*argv, "--verbose"]):
    with pytest.raises(errors.InputError, match="the folder does not exist"):
      cli.main(verbose_argv)
  with pytest.raises(errors.InputError, match="--input .*: no such file"):
    cli.run_as_script(init_from.main, ["--input", str(tmp_path / "x.pth"), "--verbose",
                                       "--output", str(tmp_path / "weights")])
  assert cli.split_verbose(["a", "--verbose", "--", "--verbose"]) == (
      ["a", "--", "--verbose"], True)


def test_a_root_handler_made_by_a_library_import_gets_the_console_format():
  # Importing Orbax logs through absl before a command starts its logging, which gives
  # the root logger a plain handler in Python's default format ("INFO:name:message").
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    cli_logging.start_console_logging()
    logging.getLogger("affect_jax.some_command").info("started")
  finally:
    root.removeHandler(handler)
  assert stream.getvalue().endswith(" I affect_jax.some_command: started\n"), (
      stream.getvalue())


def test_a_bug_keeps_its_traceback():
  def buggy_command(argv):
    return {}[argv[0]]
  with pytest.raises(KeyError):
    cli.run_as_script(buggy_command, ["x"])


def test_the_python_m_form_prints_one_error_line(tmp_path):
  missing = tmp_path / "resnet18.pth"
  result = subprocess.run(
      [sys.executable, "-m", "affect_jax.train.init_from", "--input", str(missing),
       "--output", str(tmp_path / "weights")],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert error_line(result.returncode, result.stderr) == (
      f"error: --input {missing}: no such file")


@pytest.mark.parametrize("window", [0, 4, -3])
def test_a_bad_smoothing_window_is_an_expected_error_naming_the_flag(window):
  from affect_jax import errors
  from affect_jax.inference import frame_table
  with pytest.raises(errors.InputError, match=f"--smooth_window: .* got {window}"):
    frame_table.check_window(window)
