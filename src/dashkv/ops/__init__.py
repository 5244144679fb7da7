"""Kernels of the DASH-KV decode step. ``reference`` is the readable fp32 torch version every fast
backend is tested against; :mod:`dashkv.ops.dispatch` picks the backend."""
