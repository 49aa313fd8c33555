# Sourced by the scripts in this folder with the extras they need (`source setup_env.sh
# cpu` or `test`): creates .venv on first use and installs the project with those extras.
# Each set of extras has its own marker, so a .venv set up for one script gets what
# another needs when that one first runs (torch 2.13.0 CPU comes with `test` only: a
# test reference, never a runtime need).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:?extras to install, e.g. cpu or test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
marker=".venv/.installed-${extras//,/-}"
if [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  touch "$marker"
fi
export PATH="$PWD/.venv/bin:$PATH"
