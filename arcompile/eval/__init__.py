"""Evaluation: the held-out and calibration text, calibration statistics and the accuracy
metrics (perplexity, greedy agreement) that passes, the gate and the profiler share.
Imports ir/ only."""
