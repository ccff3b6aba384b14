"""Backends that lower the IR and run it: ``onnxruntime`` (the embedded default) and others."""
