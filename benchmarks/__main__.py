"""``python -m benchmarks``: the concurrency benchmark (see benchmarks/concurrency.py)."""

from benchmarks.concurrency import main

main()
