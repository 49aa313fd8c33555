"""benchmarks/run_accelerator.sh: the script that records docs/PERFORMANCE.md's
accelerator figures is rarely run (accelerators are rarely at hand), so it is checked
here on the CPU: its full-size commands against each benchmark's own parser
(--dry-run), and a rehearsal in which every benchmark it calls runs and writes the
figures the document reads."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_accelerator.sh")


def run_script(args, env_overrides, cwd=ROOT):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", **env_overrides)
  return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900)


def rows_by_benchmark(path):
  rows = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["benchmark"], []).append(row)
  return rows


def test_refuses_a_cpu_only_jax_without_rehearse(tmp_path):
  result = run_script([str(tmp_path / "out.jsonl")], {})
  assert result.returncode != 0
  assert "no accelerator visible to JAX" in result.stderr
  assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--part", "2"], "unknown option --part"),
    (["--parts"], "--parts needs a value"),
    (["--parts", "4"], "--parts takes 1, 2 and 3"),
    (["--parts", "1, 2"], "--parts takes 1, 2 and 3"),
    (["a.jsonl", "b.jsonl"], "one results file only"),
])
def test_bad_options_exit_2_before_any_work(args, message):
  result = run_script(["--rehearse", *args], {})
  assert result.returncode == 2 and message in result.stderr
  assert "devices:" not in result.stdout


def test_dry_run_checks_the_full_size_commands(built_union, tmp_path):
  """The accelerator run's own arguments (not the rehearsal's), parsed by each
  benchmark's parser; a relative DATA_DIR is the caller's."""
  data_dir = built_union[1]
  result = run_script(["--dry-run", "out.jsonl"],
                      {"DATA_DIR": os.path.relpath(data_dir, tmp_path)}, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  commands = [json.loads(line) for line in result.stdout.splitlines()
              if line.startswith('{"dry_run"')]
  assert [c["dry_run"] for c in commands] == [
      "train_step_throughput.py", "train_step_throughput.py", "metrics_vs_sklearn.py",
      "metrics_vs_sklearn.py", "device_data.py", "input_pipeline.py", "train_feeds.py"]
  xla_steps, cpu_steps, *metrics_runs, device, pipeline, feeds = commands
  out = str(tmp_path / "out.jsonl")
  assert all(c["out"] == out for c in commands)
  assert (xla_steps["implementations"], xla_steps["batch_sizes"]) == ("xla", "128,256,512")
  assert (cpu_steps["implementations"], cpu_steps["batch_sizes"]) == ("cpu", "256")
  for steps in (xla_steps, cpu_steps):
    assert steps["config"] == "configs/default.py" and steps["device_data"]
    assert steps["dtypes"] == "bfloat16,float32" and steps["steps"] == 20
  assert [m["batch"] for m in metrics_runs] == [8192, 512]
  assert all(m["frames"] == 1_000_000 for m in metrics_runs)
  assert device["batch_size"] == 256 and pipeline["before_rev"] == "none"
  for command in (device, pipeline, feeds):
    assert os.path.realpath(command["data_dir"]) == os.path.realpath(data_dir)
  assert feeds["config"] == "configs/default.py" and feeds["dtype"] == "bfloat16"
  assert not (tmp_path / "out.jsonl").exists()


def test_parts_select_the_benchmarks_and_a_rehearsal_stays_out_of_results(tmp_path):
  result = run_script(["--rehearse", "--parts", "2"], {"TMPDIR": str(tmp_path)})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = rows_by_benchmark(tmp_path / "run_accelerator_rehearsal.jsonl")
  assert {b: len(r) for b, r in rows.items()} == {"metrics_vs_sklearn": 2}
  assert all(row["rehearsal"] is True for row in rows["metrics_vs_sklearn"])


def test_rehearsal_writes_every_figure(built_union, tmp_path):
  out = tmp_path / "results" / "accelerator.jsonl"
  result = run_script(["--rehearse", str(out)], {"DATA_DIR": built_union[1]})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = rows_by_benchmark(out)
  assert all(row["rehearsal"] is True for group in rows.values() for row in group)

  steps = rows["train_step_throughput"]
  assert {(r["dtype"], r["implementation"]) for r in steps} == {
      (d, i) for d in ("bfloat16", "float32") for i in ("xla", "cpu")}
  for row in steps:
    assert row["config"] == "configs/tiny.py" and row["batch_size"] == 8
    for key in ("train_images_per_s", "eval_images_per_s",
                "train_device_data_images_per_s", "matmul_peak_tflops",
                "epoch_s_s_affwild2", "epoch_s_s_affwild2_device_data"):
      assert row[key] > 0, (key, row)
    assert row["xla_train_gflop_per_image"] > row["xla_eval_gflop_per_image"] > 0
    # (the tiny model's rates round to 0 TFLOP/s on a CPU: present, not sized)
    for key in ("train_tflops", "train_utilisation_of_matmul_peak"):
      assert isinstance(row[key], float) and row[key] >= 0, (key, row)

  metric_rows = rows["metrics_vs_sklearn"]
  assert [r["batch"] for r in metric_rows] == [4096, 512]
  for row in metric_rows:
    assert row["affect_jax_on_device_speedup_over_sklearn"] > 0

  assert {r["policy"] for r in rows["device_data"]} >= {"none", "basic"}
  for row in rows["device_data"]:
    assert row["device_images_per_s"] > 0 and row["host_images_per_s"] > 0
  assert {r["policy"] for r in rows["input_pipeline"]} >= {"none", "basic", "strong"}

  (feeds,) = rows["train_feeds"]
  assert feeds["dtype"] == "bfloat16"
  for feed in ("host_pipeline", "device_resident"):
    assert feeds[f"{feed}_steps_per_s"] > 0
    assert 0.0 <= feeds[f"{feed}_input_bound_fraction"] <= 1.0
  assert "results in" in result.stdout
