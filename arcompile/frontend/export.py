"""Export a PyTorch module that maps token ids [B, T] to logits [B, T, V].

This is how arcompile turns an nn.Module (or a Hugging Face model it loaded itself) into a
torch.export ExportedProgram with B and T dynamic. Hugging Face models are wrapped so the
traced forward takes only ``input_ids`` and returns only the logits, with no cache.
"""

from __future__ import annotations

import warnings

import torch
from torch.export import Dim, ExportedProgram

from arcompile.errors import ModelLoadError

EXAMPLE_SHAPE = (2, 8)  # B=2, T=8: neither may be 0 or 1, or torch.export specializes on it


class LogitsOnly(torch.nn.Module):
    """Adapts a Hugging Face causal LM to the contract ``tokens -> logits``, no cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def example_tokens(vocab_size: int, shape: tuple[int, int] = EXAMPLE_SHAPE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, shape, generator=gen)


def export_module(module: torch.nn.Module, example_inputs: tuple | None = None,
                  vocab_size: int | None = None) -> ExportedProgram:
    """torch.export ``module`` with the batch and sequence dims of its token input dynamic."""
    if example_inputs is None:
        if vocab_size is None:
            raise ModelLoadError("exporting a module needs example_inputs or its vocab_size")
        example_inputs = (example_tokens(vocab_size),)
    module = module.eval()
    dynamic = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) + (None,) * (len(example_inputs) - 1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic,
                                       strict=False)
    except Exception as e:  # torch raises many unrelated types here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"torch.export could not trace the model with dynamic batch and "
                             f"sequence dims: {first}") from e
