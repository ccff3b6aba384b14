"""Writes tests/data/engine_f254def: a tiny LLaMA engine from arcompile f254def (before the
layering), with what it decoded then."""
import sys, json
sys.path.insert(0, "tests")
import numpy as np
import arcompile, tiny_models as tm
out = sys.argv[1]
arcompile.optimize(tm.llama(), out, log=None, quantize="int8")
eng = arcompile.load(out)
prompts = [[5, 17, 42, 8, 3, 99, 250, 7], [400, 12, 9]]
greedy = eng.generate(prompts, max_new_tokens=10)
sampled = eng.generate(prompts[0], max_new_tokens=10, temperature=0.8, seed=1)
logits = eng.logits([prompts[0]])[0][-3:]
json.dump({"written_by": "arcompile f254def", "prompts": prompts, "greedy": greedy,
           "sampled_t0.8_seed1": sampled, "logits_first_prompt_last3": np.round(logits, 6).tolist()},
          open(out + "/../decoded.json", "w"))
print(greedy, sampled)
