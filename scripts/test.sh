#!/usr/bin/env bash
# README's test command: sets up .venv if needed, then runs the whole pytest suite.
source "$(dirname "$0")/setup_env.sh"
python -m pytest -q -n 2 tests "$@"
