"""Benchmarks of balloonctl's speed and scale: ``python -m tests.bench``.

Each sub-benchmark (reaction, cost, isolation, memory, real) repeats its
measurement and reports every figure as min, median and max over the
repeats, with the machine's load average before and after. The results are
printed and written as JSON (``--out`` or ``BENCH_OUT``, default
``bench-results.json``). These are measurements, not tests: nothing here
asserts a timing.
"""
