"""Benchmarks: speed and memory (``openautoglm bench``) and quality (``openautoglm eval``).

Each system under test runs in its own subprocess (``worker.py``) so that its peak RSS is honest; the parent
(``run.py``) collects the results, prints the table, writes JSON and the plot (``report.py``).
"""
