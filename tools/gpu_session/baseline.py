"""An earlier commit's op library, importable beside the current one, to time old against new
kernels in one run (tools.gpu_session.tune --baseline).

    python -m tools.gpu_session.baseline export 7acb609   # writes .baseline/7acb609/ (ignored)
    python -m tools.gpu_session.tune --baseline .baseline/7acb609

The export is `git archive REV stm_kernels` with the custom-op namespace renamed
(stm_kernels:: -> stm_kernels_baseline::), so both libraries register their ops in one process.
Nothing of the old code is committed; the folder travels to a GPU machine as a carried path.
"""
import argparse
import importlib.util
import io
import pathlib
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "stm_kernels_baseline"


def export(revision, directory=None):
    """Write REV's stm_kernels as <directory>/stm_kernels (default .baseline/<rev>); return it."""
    archive = subprocess.run(["git", "archive", revision, "stm_kernels"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    target = pathlib.Path(directory or ROOT / ".baseline" / revision)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    for path in (target / "stm_kernels").rglob("*.py"):
        text = path.read_text()
        text = text.replace("stm_kernels::", f"{PACKAGE}::")
        text = text.replace("torch.ops.stm_kernels.", f"torch.ops.{PACKAGE}.")
        path.write_text(text)
    (target / "REVISION").write_text(revision + "\n")
    return target


def load(directory):
    """Import an exported library as the package `stm_kernels_baseline`."""
    package_dir = pathlib.Path(directory) / "stm_kernels"
    if not (package_dir / "__init__.py").exists():
        raise FileNotFoundError(f"{directory}: no exported stm_kernels (python -m "
                                "tools.gpu_session.baseline "
                                "export REV)")
    spec = importlib.util.spec_from_file_location(
        PACKAGE, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def revision(directory):
    """The revision an export was made from (its REVISION file), else the folder's name."""
    path = pathlib.Path(directory) / "REVISION"
    return path.read_text().strip() if path.exists() else str(directory)


def main(argv=None):
    """`python -m tools.gpu_session.baseline export REV`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export_parser = sub.add_parser("export", help="export REV's stm_kernels")
    export_parser.add_argument("revision")
    export_parser.add_argument("--to", default=None, help="folder (default .baseline/REV)")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.revision, args.to)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
