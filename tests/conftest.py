"""Shared fixtures. The real SmolLM2 pieces are session-scoped: loading the GGUF and exporting
it take ~25 s, so every test that needs them shares one copy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2 from the wheel, loaded once: a LoadedModel whose ``module`` is the
    eager tokens->logits module that was exported."""
    from arcompile.frontend.load import find_smollm2_gguf, load_model

    return load_model(str(find_smollm2_gguf()), log=lambda _m: None)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2, tmp_path_factory):
    """The real SmolLM2 optimized with the default pipeline into an engine directory."""
    import arcompile

    out = tmp_path_factory.mktemp("engines") / "smollm2"
    arcompile.optimize(smollm2, out, log=None)
    return out


@pytest.fixture(scope="session")
def smollm2_decomposed(smollm2):
    """The same SmolLM2 program after ``run_decompositions()``: attention as bmm / softmax /
    where, the second traced form every fusion must handle (~20 s)."""
    import dataclasses

    return dataclasses.replace(smollm2, program=smollm2.program.run_decompositions())


@pytest.fixture(scope="session")
def smollm2_decomposed_engine(smollm2_decomposed, tmp_path_factory):
    """The decomposed SmolLM2 through the default pipeline."""
    import arcompile

    out = tmp_path_factory.mktemp("engines") / "smollm2_decomposed"
    arcompile.optimize(smollm2_decomposed, out, log=None)
    return out
