"""The host path's layers, as `python -m bench host-path` times them (bench/host_path.py).

    python -m tools.gpu_session.host_path [--ns 16200 1620] [--calls 300]

Kept for the GPU session (gpu_session.sh) and the tools that import its names: everything here
is bench.host_path's.
"""
from bench.host_path import *  # noqa: F401,F403
from bench.host_path import (SMALL, SMALL_N, _direct_launches, _gluon_runs,  # noqa: F401
                             _materialised, _nothing, _small_cpu_layers, main)

if __name__ == "__main__":
    main()
