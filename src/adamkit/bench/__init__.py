"""Offline benchmarks: tasks on real data, the compare runner, the throughput benchmark, reports."""
