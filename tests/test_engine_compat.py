"""An engine directory written before the layering (arcompile f254def, by
``tests/data/engine_f254def/write_it.py``: tiny LLaMA, int8 weights, in-place cache) loads
with today's code and decodes what it decoded then."""

import json
import shutil
from pathlib import Path

import numpy as np

import arcompile

DATA = Path(__file__).parent / "data" / "engine_f254def"


def test_engine_written_before_the_layering_decodes_the_same(tmp_path):
    want = json.loads((DATA / "decoded.json").read_text())
    folder = tmp_path / "engine"
    shutil.copytree(DATA / "engine", folder)  # loading may not write, but keep the data pristine
    eng = arcompile.load(folder)
    assert eng.kv_cache and eng.manifest["format_version"] == 1
    prompts = want["prompts"]
    assert eng.generate(prompts, max_new_tokens=10) == want["greedy"]
    assert eng.generate(prompts[0], max_new_tokens=10, temperature=0.8, seed=1) == \
        want["sampled_t0.8_seed1"]
    logits = eng.logits([prompts[0]])[0][-3:]
    then = np.array(want["logits_first_prompt_last3"])
    # another CPU's kernels round differently: within 1e-4 of the logits' magnitude (the
    # lowering check's bound), far below what a misread weight or cache would change
    assert np.abs(logits - then).max() <= 1e-4 * max(1.0, np.abs(then).max())
