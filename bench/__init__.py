"""Benchmark harness: the hub, VictoriaMetrics and load generators as separate processes (see docs/benchmarks.md)."""
