"""Evaluation suites of DASH-KV (LongBench: :mod:`dashkv.eval.longbench`, :mod:`dashkv.eval.metrics`)."""
