"""Benchmarks: the dispatcher against the patterns people use today, measured in one run.

``python -m bench`` (``make bench``) runs every scenario against MiniStack child
processes on loopback and writes ``bench/results/``: one JSON file per scenario (raw
numbers and the machine they came from), ``summary.md`` and the PNG plots.
"""
