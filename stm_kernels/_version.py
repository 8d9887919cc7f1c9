"""The one version number of the stm-kernels distribution (setup.py reads it from here)."""
__version__ = "0.1.0"
