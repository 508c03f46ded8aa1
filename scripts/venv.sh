# Sourced by run_local.sh and run_tests.sh: makes sure .venv exists and holds
# the project with its pinned dependencies, installing only when setup.py or
# constraints.txt changed since the last install (a re-run does not
# reinstall).
#   usage: ensure_venv [EXTRA]     e.g. ensure_venv test
set -euo pipefail

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: no python3 found (Python 3.11 is needed)" >&2
  return 1
}

ensure_venv() {
  local extra="${1:-}" root venv digest stamp python target
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv"
  digest="$(cat "$root/setup.py" "$root/constraints.txt" | sha256sum | cut -c1-16)"
  stamp="$venv/.installed-${extra:-base}-$digest"
  [ -f "$stamp" ] && return 0
  if [ ! -x "$venv/bin/python" ]; then
    python="$(pick_python)"
    echo "Creating virtual environment in $venv with $($python --version)" >&2
    "$python" -m venv "$venv"
  fi
  echo "Installing dependencies into $venv (first run only; a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  target="$root"
  [ -n "$extra" ] && target="$root[$extra]"
  "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" \
    -e "$target" >&2
  touch "$stamp"
}
