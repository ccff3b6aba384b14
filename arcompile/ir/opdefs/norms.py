"""Reference implementations of the arc.* norms ops (filled in by the fusion work)."""
