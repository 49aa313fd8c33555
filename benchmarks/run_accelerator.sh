#!/usr/bin/env bash
# The performance figures of docs/PERFORMANCE.md on a GPU or TPU host, bf16 and f32.
#
#   bash benchmarks/run_accelerator.sh [--rehearse] [--dry-run] [--parts 1,2,3] [results file]
#
# Options may come before or after the results file. A relative results file or
# DATA_DIR is taken from the calling directory.
#
# Parts (all by default; each fits in a few minutes on one H100, so a host that limits
# one command's time can run them one by one into the same results file):
#   1  train / eval step throughput, FLOP utilisation, device-resident epoch seconds
#   2  metrics against scikit-learn
#   3  device-resident data, input pipeline and whole fed training steps (needs a dataset)
#
# Needs a JAX for the accelerator (jax[cuda13], jax[cuda12] or jax[tpu]) and the project's packages;
# the project itself is read from this tree (PYTHONPATH), so an uninstalled copy works.
# Writes JSON lines (machine, date, load in each) to the results file (default
# benchmarks/results/accelerator.jsonl) and prints them. Each step is short: a few
# minutes in all on one H100.
#
# --dry-run prints, as JSON lines, the arguments each benchmark would run with, parsed
# by its own parser, and runs nothing (any machine; the test suite checks them).
#
# --rehearse runs every step on whatever JAX sees (the CPU too) with the tiny model,
# batch 8 and a step or two per figure: a check of a few minutes that the script and
# the benchmarks it calls still fit together, before spending accelerator time on it
# (tests/test_run_accelerator.py runs it). Its figures mean nothing: its rows say
# "rehearsal": true, and without a results file they go to
# $TMPDIR/run_accelerator_rehearsal.jsonl, never to benchmarks/results/.
set -euo pipefail
usage() { echo "$1 (usage: see the top of $0)" >&2; exit 2; }
REHEARSE=0
PARTS=1,2,3
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1; shift ;;
    --dry-run) export AFFECT_JAX_BENCH_DRY_RUN=1; shift ;;
    --parts) [ $# -ge 2 ] || usage "--parts needs a value"; PARTS="$2"; shift 2 ;;
    -*) usage "unknown option $1" ;;
    *) [ -z "$OUT" ] || usage "one results file only, after the options"; OUT="$1"; shift ;;
  esac
done
[[ "$PARTS" =~ ^[123](,[123])*$ ]] || usage "--parts takes 1, 2 and 3, comma-separated"
wanted() { [[ ",$PARTS," == *",$1,"* ]]; }
# Relative paths are the caller's; the benchmarks run from the repository's root.
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
if [ -n "$OUT" ]; then OUT="$(absolute "$OUT")"
elif [ "$REHEARSE" = 1 ]; then  # never into the results file the document reads
  OUT="${TMPDIR:-/tmp}/run_accelerator_rehearsal.jsonl"
fi
if [ -n "${DATA_DIR:-}" ]; then DATA_DIR="$(absolute "$DATA_DIR")"; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/accelerator.jsonl}"
if [ "$REHEARSE" = 1 ]; then export AFFECT_JAX_BENCH_REHEARSAL=1; fi
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif command -v python >/dev/null; then PY=python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUT")"
REHEARSE=$REHEARSE "$PY" - <<'PYEOF'
import os
import jax
print("devices:", jax.devices(), "backend:", jax.default_backend(), "jax", jax.__version__)
if (jax.default_backend() == "cpu" and os.environ["REHEARSE"] != "1"
    and os.environ.get("AFFECT_JAX_BENCH_DRY_RUN") != "1"):
    raise SystemExit("no accelerator visible to JAX: install jax[cuda13] or jax[tpu] "
                     "(or pass --rehearse to check the script on the CPU)")
PYEOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
      | tee -a "${OUT%.jsonl}.nvidia-smi.txt"
fi

if [ "$REHEARSE" = 1 ]; then
  MODEL=(--config configs/tiny.py)
  STEP_SIZES=(--steps 2 --rounds 1 --matmul_n 256)
  XLA_BATCHES=8
  CPU_FORMULATION_BATCHES=8
  METRICS_SIZES=(--frames 32768 --rounds 1)
  METRICS_BATCHES=(4096 512)
  DATA_BATCH=8
  DATA_SIZES=(--batches 2 --rounds 1)
  FEED_SIZES=(--steps 2 --rounds 1)
else
  MODEL=(--config configs/default.py)
  STEP_SIZES=(--steps 20 --rounds 3)
  XLA_BATCHES=128,256,512
  CPU_FORMULATION_BATCHES=256
  METRICS_SIZES=(--frames 1000000)  # (never empty: bash < 4.4 calls "${a[@]}" unbound)
  METRICS_BATCHES=(8192 512)
  DATA_BATCH=256
  DATA_SIZES=(--batches 20)
  FEED_SIZES=(--steps 20)
fi

# 1. Train / eval step throughput and FLOP utilisation against a measured matmul peak,
#    bf16 and f32, flax formulation ("xla", what "auto" picks on an accelerator) and the
#    step fed by device-resident data (the 10-second-epoch question); then the XLA:CPU
#    formulation ("cpu") at one batch size, to check it does not also help (or hurt) here.
if wanted 1; then
  for spec in "xla $XLA_BATCHES" "cpu $CPU_FORMULATION_BATCHES"; do
    read -r implementation batches <<<"$spec"
    "$PY" benchmarks/train_step_throughput.py "${MODEL[@]}" --dtypes bfloat16,float32 \
        --implementations "$implementation" --batch_sizes "$batches" "${STEP_SIZES[@]}" \
        --device_data --augment basic --out "$OUT"
  done
fi

# 2. Metrics: jitted streaming statistics against scikit-learn over 1M frames.
if wanted 2; then
  for batch in "${METRICS_BATCHES[@]}"; do
    "$PY" benchmarks/metrics_vs_sklearn.py --batch "$batch" "${METRICS_SIZES[@]}" \
        --out "$OUT"
  done
fi

# 3. Device-resident data against the host pipeline (needs a built dataset; the demo
#    one is made by `python -m affect_jax.demo` or the README's first command).
DATA_DIR="${DATA_DIR:-runs/demo/tfds}"
if ! wanted 3; then
  :
elif [ -d "$DATA_DIR/affwild2" ]; then
  "$PY" benchmarks/device_data.py --data_dir "$DATA_DIR" --batch_size "$DATA_BATCH" \
      "${DATA_SIZES[@]}" --out "$OUT"
  # (the library alone: a copy of the tree may come without .git for the before peer)
  "$PY" benchmarks/input_pipeline.py --data_dir "$DATA_DIR" "${DATA_SIZES[@]}" \
      --before_rev none --out "$OUT"
  # Whole training steps of the default config (full ResNet-18, batch 256, bf16) fed
  # by the host pipeline (8 grain workers) and by device-resident data: steps/s and
  # whether the device waits for data.
  "$PY" benchmarks/train_feeds.py --data_dir "$DATA_DIR" "${MODEL[@]}" \
      --dtype bfloat16 "${FEED_SIZES[@]}" --out "$OUT"
else
  echo "no dataset in $DATA_DIR: skipping the data benchmarks (set DATA_DIR)"
fi
if [ "${AFFECT_JAX_BENCH_DRY_RUN:-}" = 1 ]; then echo "dry run: nothing measured"
else echo "results in $OUT"; fi
