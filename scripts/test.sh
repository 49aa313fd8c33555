#!/usr/bin/env bash
# README's test command: sets up .venv if needed (the project with its `test` extras),
# then runs the whole pytest suite.
source "$(dirname "$0")/setup_env.sh" test
# --dist loadfile: a module's tests share one worker, so module fixtures (a trained
# tiny run) are built once.
python -m pytest -q -n 2 --dist loadfile tests "$@"
