"""Benchmarks for issue 8: speed, memory and limiter accuracy against the targets and against mailmerge.

`python -m benchmarks` runs every case in its own process and prints the table; see README.md.
"""
