"""arcompile: a compiler for autoregressive decoding.

    import arcompile
    arcompile.optimize("model.pt2", "out/engine")   # trace → IR → passes → ONNX Runtime engine
    eng = arcompile.load("out/engine")
    eng.generate([1, 2, 3], max_new_tokens=16)
"""

__version__ = "0.1.0"

from arcompile.errors import ArcompileError  # noqa: E402


def optimize(model, output_dir, example_inputs=None, **options):
    """Optimize a model (path, nn.Module or ExportedProgram) into an engine directory.

    See ``arcompile.compiler.optimize.optimize`` for the options.
    """
    from arcompile.compiler.optimize import optimize as _optimize

    return _optimize(model, output_dir, example_inputs=example_inputs, **options)


def load(path, threads=None):
    """Open an engine directory; see ``arcompile.serve.engine.Engine``."""
    from arcompile.serve.engine import load as _load

    return _load(path, threads=threads)


__all__ = ["optimize", "load", "ArcompileError", "__version__"]
