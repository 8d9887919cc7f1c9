"""The tests' shared helpers (tests/helpers.py) importable from every subject folder."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
