#!/usr/bin/env bash
# The performance figures of docs/PERFORMANCE.md on a GPU or TPU host, bf16 and f32.
#
#   bash benchmarks/run_accelerator.sh [results file]
#
# Needs the project installed with a JAX for the accelerator (jax[cuda12] / jax[tpu]).
# Writes JSON lines (machine, date, load in each) to the results file (default
# benchmarks/results/accelerator.jsonl) and prints them. Each step is short: a few
# minutes in all on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/accelerator.jsonl}"
PY="${PYTHON:-python}"
mkdir -p "$(dirname "$OUT")"
"$PY" - <<'PYEOF'
import jax
print("devices:", jax.devices(), "backend:", jax.default_backend(), "jax", jax.__version__)
if jax.default_backend() == "cpu":
    raise SystemExit("no accelerator visible to JAX: install jax[cuda12] or jax[tpu]")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "${OUT%.jsonl}.nvidia-smi.txt"

# 1. Train / eval step throughput and FLOP utilisation against a measured matmul peak,
#    bf16 and f32, flax formulation ("xla", what "auto" picks on an accelerator) and the
#    XLA:CPU formulation ("cpu") to check it does not also help (or hurt) here, and the
#    step fed by device-resident data (the 10-second-epoch question).
"$PY" benchmarks/train_step_throughput.py --dtypes bfloat16,float32 \
    --implementations xla,cpu --batch_sizes 128,256,512 --steps 20 --rounds 3 \
    --device_data --augment basic --out "$OUT"

# 2. Metrics: jitted streaming statistics against scikit-learn over 1M frames.
"$PY" benchmarks/metrics_vs_sklearn.py --batch 8192 --out "$OUT"
"$PY" benchmarks/metrics_vs_sklearn.py --batch 512 --out "$OUT"

# 3. Device-resident data against the host pipeline (needs a built dataset; the demo
#    one is made by `python -m affect_jax.demo` or the README's first command).
DATA_DIR="${DATA_DIR:-runs/demo/tfds}"
if [ -d "$DATA_DIR/affwild2" ]; then
  "$PY" benchmarks/device_data.py --data_dir "$DATA_DIR" --batch_size 256 --batches 20 \
      --out "$OUT"
  # (the library alone: a copy of the tree may come without .git for the before peer)
  "$PY" benchmarks/input_pipeline.py --data_dir "$DATA_DIR" --batches 20 \
      --before_rev none --out "$OUT"
  # Whole training steps of the default config (full ResNet-18, batch 256, bf16) fed
  # by the host pipeline (8 grain workers) and by device-resident data: steps/s and
  # whether the device waits for data.
  "$PY" benchmarks/train_feeds.py --data_dir "$DATA_DIR" --config configs/default.py \
      --dtype bfloat16 --steps 20 --out "$OUT"
else
  echo "no dataset in $DATA_DIR: skipping the data benchmarks (set DATA_DIR)"
fi
echo "results in $OUT"
