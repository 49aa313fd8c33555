#!/usr/bin/env bash
# README's main job: sets up .venv if needed (the project with its `cpu` extra), then
# synthetic release -> TFDS build -> multi-task training -> evaluation -> checkpoint ->
# report (runs/demo/report/).
source "$(dirname "$0")/setup_env.sh" cpu
affect-jax demo --workdir runs/demo "$@"
