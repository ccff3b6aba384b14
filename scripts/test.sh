#!/usr/bin/env bash
# Set up .venv, then run the test suite quietly. Arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     bash scripts/test.sh tests/test_ir.py -x
# Exits with pytest's status. Collecting no tests (pytest's status 5) is a failure here too,
# and is said so: a suite that silently ran nothing must not pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup-venv.sh
source scripts/setup-venv.sh

# The SmolLM2 tests write engines of up to 1 GB under pytest's temp folder (each removed when its
# test passes); with less free than the peak the run fails late with ENOSPC, so say it first.
tmp_dir="${TMPDIR:-/tmp}"
free_mb=$(df -Pm "$tmp_dir" 2>/dev/null | awk 'NR == 2 {print $4}') || free_mb=''
if [[ -n "$free_mb" && "$free_mb" -lt 3000 ]]; then
  echo "test.sh: warning: $tmp_dir has ${free_mb} MB free; the suite needs about 2 GB there at its peak" >&2
fi

# The floors of arcompile/ import one way (the contracts in pyproject.toml): an upward import
# fails here, before the tests, with the line that made it.
lint_log=$(mktemp)
if ! lint-imports --no-cache >"$lint_log" 2>&1; then
  sed -n '/Broken contracts/,$p' "$lint_log" >&2
  rm -f "$lint_log"
  echo "test.sh: lint-imports found an import that runs against the layers (see above)" >&2
  exit 1
fi
rm -f "$lint_log"

status=0
python -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "test.sh: pytest collected no tests (exit 5); treating that as a failure" >&2
fi
exit "$status"
