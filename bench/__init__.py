"""Benchmarks for lora-sweep: `python -m bench [--quick] [--gpu]` prints a table and writes Parquet.

Every comparison is measured side by side in one run and reported as the median of short repeats.
"""
