"""Install lines that work as written: every `pip install` of this project in the docs and in
the messages names a clone (`pip install "/path/to/stm-kernels[cutie]"`: no package index has
stm-kernels), the integrations' extras pin the versions their guards accept, and each extra,
installed from a clone into a fresh virtual environment, gives a `use_fused_read` that patches.
"""
import ast
import importlib
import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# An install of this project from an index: "stm-kernels[...]" or "pip install stm-kernels"
# anywhere but at the end of a path ("/path/to/stm-kernels[cutie]", ".../stm-kernels").
_FROM_AN_INDEX = re.compile(r"(?<![/\w.-])stm-kernels\[|pip install\s+[\"']?stm-kernels\b")


def _texts():
    """(path relative to the root, text) of the pages and the project's Python sources."""
    paths = [ROOT / "README.md", ROOT / "setup.py", ROOT / "Makefile",
             *sorted((ROOT / "docs").glob("*.md"))]
    for package in ("stm_kernels", "stm_model", "bench", "tools"):
        paths += sorted((ROOT / package).rglob("*.py"))
    return [(path.relative_to(ROOT), path.read_text(encoding="utf-8")) for path in paths]


def test_install_lines_name_a_clone_not_an_index():
    found = [f"{path}:{text[:match.start()].count(chr(10)) + 1}: "
             f"{text.splitlines()[text[:match.start()].count(chr(10))].strip()}"
             for path, text in _texts() for match in _FROM_AN_INDEX.finditer(text)]
    assert not found, ("no index has stm-kernels: write pip install \"/path/to/stm-kernels"
                       "[extra]\" (a clone) instead of\n" + "\n".join(found))


def _extras():
    """setup.py's extras_require, read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


INTEGRATIONS = [("cutie", "rf-cutie", "cutie"), ("stcn", "stcnbuf", "stcnbuf")]


@pytest.mark.parametrize("extra, distribution, module", INTEGRATIONS,
                         ids=[extra for extra, _, _ in INTEGRATIONS])
def test_the_integration_extras_pin_the_versions_their_guards_know(extra, distribution,
                                                                   module):
    """A `>=` extra would install a later release that use_fused_read refuses (its functions
    changed): the extra pins the newest version the guard has fingerprints of."""
    integration = importlib.import_module(f"stm_kernels.integrations.{extra}")
    newest = list(integration._KNOWN_FINGERPRINTS)[-1]
    assert _extras()[extra] == [f"{distribution}=={newest}"]
    assert integration._PINNED == newest


def _distribution_entries(name):
    """The top-level names the installed distribution `name` has in site-packages (none when
    it is not installed)."""
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {file.parts[0] for file in files if file.parts and file.parts[0] != ".."}


def _run(command, cwd, timeout=240):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


_CHECKS = {
    "cutie": """
from cutie.inference.memory_manager import MemoryManager
from stm_kernels.integrations.cutie import use_fused_read
manager = MemoryManager.__new__(MemoryManager)  # the guard reads its class's functions only
assert use_fused_read(manager) is manager and manager.read.func.__name__ == "_fused_manager_read"
""",
    "stcn": """
from stcnbuf.inference_memory_bank import MemoryBank
from stm_kernels.integrations.stcn import use_fused_read
bank = MemoryBank(2, top_k=3)
assert use_fused_read(bank) is bank and type(bank) is not MemoryBank
""",
}


@pytest.mark.parametrize("extra, distribution, module", INTEGRATIONS,
                         ids=[extra for extra, _, _ in INTEGRATIONS])
def test_each_integration_extra_installs_from_a_clone_and_patches(extra, distribution, module,
                                                                   tmp_path):
    """`pip install "/path/to/stm-kernels[EXTRA]"` into a fresh virtual environment (torch and
    the other dependencies are this environment's, seen through a path file, all but this
    project and the extra's package, which the install must bring), then use_fused_read.
    The extra's package comes from a package index once (`pip download`), the rest offline;
    skipped when it cannot be had."""
    requirement = _extras()[extra][0]
    wheels = tmp_path / "wheels"
    download = _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                     "--dest", str(wheels), requirement], tmp_path, timeout=120)
    if download.returncode != 0:
        pytest.skip(f"cannot download {requirement}: {download.stderr.strip()[-300:]}")
    # this environment's packages, less this project and the extra's own package
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    left_out = _distribution_entries("stm-kernels") | _distribution_entries(distribution)
    shared = tmp_path / "shared-site"
    shared.mkdir()
    for entry in site.iterdir():
        if entry.name not in left_out and entry.name != "__pycache__":
            (shared / entry.name).symlink_to(entry)
    environment = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(environment)], tmp_path)
    assert made.returncode == 0, made.stderr
    python = environment / "bin" / "python"
    own_site = pathlib.Path(_run([str(python), "-c", "import sysconfig; print(sysconfig."
                                  "get_paths()['purelib'])"], tmp_path).stdout.strip())
    (own_site / "_shared_site.pth").write_text(f"{shared}\n")
    # a clone: the files a checkout has that the install reads
    clone = tmp_path / "stm-kernels"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("stm_kernels", "stm_model"):
        shutil.copytree(ROOT / name, clone / name, ignore=ignore)
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, clone / name)
    install = _run([str(python), "-m", "pip", "install", "--quiet", "--no-index",
                    "--find-links", str(wheels), "--no-build-isolation",
                    f"{clone}[{extra}]"], tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    check = _run([str(python), "-c", f"""
import importlib.metadata, sys
import stm_kernels, {module}
for imported in (stm_kernels, {module}):  # the fresh installs, not this environment's
    location = imported.__file__ or list(imported.__path__)[0]  # cutie: a namespace package
    assert location.startswith(sys.prefix), location
print(importlib.metadata.version("{distribution}"))
{_CHECKS[extra]}"""], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.split() == [requirement.split("==")[1]]
