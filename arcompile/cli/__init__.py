"""The top floor: the command line (``main.py``), ``inspect`` (``describe.py``) and
``profile`` (``profiling.py`` and the per-engine subprocess ``profile_measure.py``)."""
