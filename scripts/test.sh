#!/usr/bin/env bash
# Set up .venv, then run the test suite quietly. Arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     bash scripts/test.sh tests/test_ir.py -x
# Exits with pytest's status. Collecting no tests (pytest's status 5) is a failure here too,
# and is said so: a suite that silently ran nothing must not pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup-venv.sh
source scripts/setup-venv.sh

status=0
python -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "test.sh: pytest collected no tests (exit 5); treating that as a failure" >&2
fi
exit "$status"
