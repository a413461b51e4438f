#!/usr/bin/env bash
# Finds or creates the project's virtual environment (.venv, Python >= 3.12) and installs lcjax
# with its test dependencies, JAX pinned by constraints.txt. Re-installs only when
# pyproject.toml or constraints.txt changed. Prints the path of the environment's python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LCJAX_VENV:-$root/.venv}"

works() { "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python312() {
  # Prefer 3.12, the GPU machine's version; pyenv shims exist for versions that are not active,
  # so every candidate is tried, not just looked up.
  for cand in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 /usr/local/bin/python3.12 \
              /usr/bin/python3.12 python3.13 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin/python3 python3; do
    if works "$cand"; then command -v "$cand"; return 0; fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python312)" || { echo "lcjax needs Python >= 3.12 and found none (tried python3.12, pyenv, /usr/bin)." >&2; exit 1; }
  echo "creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi

stamp="$venv/.lcjax-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing lcjax and its dependencies into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
