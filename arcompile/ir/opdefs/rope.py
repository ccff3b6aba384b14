"""Reference implementations of the arc.* rope ops (filled in by the fusion work)."""
