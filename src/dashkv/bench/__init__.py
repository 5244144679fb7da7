"""Benchmarks: programs that time DASH-KV against dense attention in the same run (never timed tests)."""
