#!/usr/bin/env bash
# README's main job: sets up .venv if needed, then synthetic release -> TFDS build ->
# multi-task training -> evaluation -> checkpoint -> report (runs/demo/report/).
source "$(dirname "$0")/setup_env.sh"
python -m affect_jax.demo --workdir runs/demo "$@"
