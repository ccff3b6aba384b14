"""Reference implementations of the arc.* mlp ops (filled in by the fusion work)."""
