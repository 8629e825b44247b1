"""Benchmarks of cumo_kernels' MoE MLP block against CuMo's loop, sorted dispatch + grouped_mm
and dense GEMMs of the same FLOPs: `python -m benchmarks --help`."""
