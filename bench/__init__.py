"""Benchmarks of stm-kernels; results (JSON + PNG) land in bench/results/."""
