"""Benchmarks (DESIGN §8): measured, never asserted.

``python -m bench`` runs them side by side and prints the ratios; ``pytest
bench --benchmark-disable`` is the quick smoke run CI uses.  ``BENCH_SCALE``
multiplies every tree's file count (``BENCH_SCALE=0.01`` for a smoke pass).
"""
