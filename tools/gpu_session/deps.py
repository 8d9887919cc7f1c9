"""Pure-Python packages the lent GPU machine lacks, copied from this environment into .gpu_deps/
(ignored) so that they travel with a call (carry=[".gpu_deps"]): Cutie and what it imports,
for `bench integrations` (issue 57, item 7). The machine has torch and Triton but no internet.

    python -m tools.gpu_session.deps                  # writes .gpu_deps/ (about 5 MB)

gpu_session.sh puts .gpu_deps on PYTHONPATH for the integrations step only, after the work
tree, so that nothing there shadows what the machine has.
"""
import argparse
import importlib.util
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = ROOT / ".gpu_deps"
# Import names: rf-cutie and the packages it imports that torch does not bring (PyYAML's C
# speed-up is optional: without its extension yaml runs in Python).
PACKAGES = ("cutie", "omegaconf", "einops", "yaml")
SKIPPED = ("__pycache__", "*.pyc", "*.so", "*.pyd")


def package_directory(name):
    """The directory of an installed import package (a namespace package's first one)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed here as a package (pip install "
                                  "-e .[cutie])")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def export(target=TARGET, packages=PACKAGES):
    """Copy each package's sources to target/<name> (replacing an older copy); returns the
    copied directories."""
    target = pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in packages:
        destination = target / name
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(package_directory(name), destination,
                        ignore=shutil.ignore_patterns(*SKIPPED))
        copied.append(destination)
    return copied


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(TARGET))
    args = parser.parse_args(argv)
    copied = export(args.target)
    size = sum(path.stat().st_size for folder in copied for path in folder.rglob("*")
               if path.is_file())
    print(f"copied {', '.join(path.name for path in copied)} into {args.target} "
          f"({size / 2**20:.1f} MiB): pass carry=[\".gpu_deps\"] to the device call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
