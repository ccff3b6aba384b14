"""Reference implementations of the arc.* attention ops (filled in by the fusion work)."""
