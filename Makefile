# make bench         the benchmark suite, one run: arcompile's presets against every peer that
#                    is installed (bench/suite.py; results in bench/results/suite.json and .md).
#                    Options go through BENCH_ARGS, e.g.
#                    make bench BENCH_ARGS="--contexts 16 --new-tokens 4 --repeats 1"
# make bench-peers   installs the optional peers where bench/suite.py looks for them by default
#                    (in /tmp: they are scratch, and large); each step is skipped when its
#                    result is already there. llama-cpp-python compiles llama.cpp (~10 min on
#                    2 cores), hence nice.

PYTHON := .venv/bin/python
BENCH_ARGS ?=
GENAI_VENV := /tmp/genai-venv
LLAMA_VENV := /tmp/llama-venv
SMOL_HF := /tmp/smol-hf

.PHONY: bench bench-peers

bench: $(PYTHON)
	$(PYTHON) bench/suite.py $(BENCH_ARGS)

$(PYTHON):
	bash scripts/setup-venv.sh

bench-peers: $(PYTHON)
	test -x $(LLAMA_VENV)/bin/python || python3 -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -c "import llama_cpp" 2>/dev/null || \
	    nice -n 19 $(LLAMA_VENV)/bin/pip install llama-cpp-python
	test -x $(GENAI_VENV)/bin/python || python3 -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -c "import onnxruntime_genai, onnxscript, transformers" 2>/dev/null || \
	    $(GENAI_VENV)/bin/pip install torch==2.13.0 onnxruntime-genai onnx-ir onnxscript transformers
	test -f $(SMOL_HF)/config.json || $(PYTHON) bench/smollm2_hf_folder.py -o $(SMOL_HF)
	test -f /tmp/smol-genai/genai_config.json || nice -n 19 $(GENAI_VENV)/bin/python -m \
	    onnxruntime_genai.models.builder -i $(SMOL_HF) -o /tmp/smol-genai -p fp32 -e cpu
	test -f /tmp/smol-genai-int4/genai_config.json || nice -n 19 $(GENAI_VENV)/bin/python -m \
	    onnxruntime_genai.models.builder -i $(SMOL_HF) -o /tmp/smol-genai-int4 -p int4 -e cpu
