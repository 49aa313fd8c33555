# Sourced by the scripts in this folder: creates .venv on first use and installs the
# project with its test extras (torch 2.13.0 CPU is a test-only reference).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
