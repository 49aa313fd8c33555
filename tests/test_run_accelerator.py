"""benchmarks/run_accelerator.sh: the script that records docs/PERFORMANCE.md's
accelerator figures is rarely run (accelerators are rarely at hand), so its rehearsal
runs here on the CPU: every benchmark it calls, with the arguments it passes, must still
run and write the figures the document reads."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_accelerator.sh")


def run_script(args, env_overrides):
  env = dict(os.environ, PYTHON=sys.executable, **env_overrides)
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


def rows_by_benchmark(path):
  rows = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["benchmark"], []).append(row)
  return rows


def test_refuses_a_cpu_only_jax_without_rehearse(tmp_path):
  result = run_script([str(tmp_path / "out.jsonl")], {"JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert "no accelerator visible to JAX" in result.stderr
  assert not (tmp_path / "out.jsonl").exists()


def test_parts_select_the_benchmarks(tmp_path):
  out = tmp_path / "out.jsonl"
  result = run_script(["--rehearse", "--parts", "2", str(out)], {"JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert {b: len(r) for b, r in rows_by_benchmark(out).items()} == {"metrics_vs_sklearn": 2}
  result = run_script(["--rehearse", "--part", "2", str(out)], {"JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2 and "unknown option --part" in result.stderr


def test_rehearsal_writes_every_figure(built_union, tmp_path):
  out = tmp_path / "results" / "accelerator.jsonl"
  result = run_script(["--rehearse", str(out)],
                      {"JAX_PLATFORMS": "cpu", "DATA_DIR": built_union[1]})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = rows_by_benchmark(out)

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
