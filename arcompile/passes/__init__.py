"""Passes over the IR, the pass manager and the pipeline."""

from arcompile.passes.base import Pass, PassResult
from arcompile.passes.manager import (
           Hook,
           NumericCheckHook,
           PassManager,
           PassRecord,
           VerifyHook,
)
from arcompile.passes.pack_attention import PackAttention
from arcompile.passes.pipeline import PASSES, build_pipeline

__all__ = ["Pass", "PassResult", "Hook", "NumericCheckHook", "PassManager", "PassRecord",
           "VerifyHook", "PASSES", "build_pipeline", "PackAttention"]
