"""The compiler floor: ``optimize`` (load, passes, KV cache, quantization gate, lowering,
writing the engine directory), its options (``options.py``; the CLI's flags are made from
them) and what it alone uses: the perplexity gate and its fallback, the self-draft writer,
the uncached-engine warning. Imports anything below it."""
