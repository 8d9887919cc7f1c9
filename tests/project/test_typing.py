"""The public API is typed: mypy passes on both packages, a user's code
gets the documented types, a wrong call is caught; one version number everywhere."""
import importlib.metadata
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import stm_kernels
import stm_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
USAGE = ROOT / "tests" / "project" / "typing" / "public_api_usage.py"


def _mypy(*paths, cwd=ROOT):
    pytest.importorskip("mypy", reason="mypy comes with the dev extra (pip install -e .[dev])")
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"),
         "--cache-dir", str(ROOT / ".mypy_cache"), *map(str, paths)],
        cwd=cwd, capture_output=True, text=True, timeout=600)
    return completed.returncode, completed.stdout + completed.stderr


def test_both_packages_type_check():
    code, output = _mypy("stm_kernels", "stm_model")
    assert code == 0, output


def test_user_code_gets_the_documented_types():
    code, output = _mypy(USAGE)
    assert code == 0, output
    revealed = {int(line): re.sub(r"\b[\w.]+\.(\w+)", r"\1", kind)
                for line, kind in re.findall(r":(\d+): note: Revealed type is \"(.+)\"", output)}
    expected = {number: text.split("# expect: ")[1].strip()
                for number, text in enumerate(USAGE.read_text().splitlines(), 1)
                if "# expect: " in text}
    assert len(expected) >= 10
    assert revealed == expected


def test_a_wrong_call_is_caught(tmp_path):
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "import torch\n"
        "from stm_kernels import memory_read\n"
        "from stm_model import VideoSegmenter, load_checkpoint\n"
        "q = torch.randn(1, 8, 4)\n"
        "memory_read(q, q, q, similarity='cosine')\n"
        "VideoSegmenter(load_checkpoint('m.pt')).step(torch.rand(3, 8, 8), mask='first.png')\n")
    code, output = _mypy(wrong)
    assert code == 1
    assert "wrong.py:5: error" in output and "wrong.py:6: error" in output, output


PUBLIC = [stm_kernels.memory_read, stm_kernels.memory_usage, stm_kernels.merge_reads,
          stm_model.VideoSegmenter, stm_model.InteractiveSession, stm_model.MemoryBank,
          stm_model.load_checkpoint, stm_model.load_official_checkpoint,
          stm_model.save_checkpoint, stm_model.FrameSequence, stm_model.segment_forward,
          stm_model.segment_backward, stm_model.segment_both_directions]


def _public_functions(target):
    if not inspect.isclass(target):
        return [target]
    return [member for name, member in vars(target).items()
            if inspect.isfunction(member) and (name == "__init__" or not name.startswith("_"))]


@pytest.mark.parametrize("target", PUBLIC, ids=lambda target: target.__qualname__)
def test_public_signatures_are_annotated(target):
    for function in _public_functions(target):
        signature = inspect.signature(function)
        missing = [name for name, parameter in signature.parameters.items()
                   if name != "self" and parameter.annotation is inspect.Parameter.empty]
        assert not missing, f"{function.__qualname__}: {missing} not annotated"
        assert signature.return_annotation is not inspect.Signature.empty, \
            f"{function.__qualname__}: no return annotation"


def test_packages_carry_py_typed():
    for package in (stm_kernels, stm_model):
        assert (pathlib.Path(package.__file__).parent / "py.typed").is_file()


def test_one_version_number():
    """stm_kernels/_version.py is the only place it is written: setup.py reads it, both packages
    and the CLI report it."""
    assert stm_model.__version__ == stm_kernels.__version__
    assert importlib.metadata.version("stm-kernels") == stm_kernels.__version__
    setup = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert setup.stdout.strip().splitlines()[-1] == stm_kernels.__version__
    assert stm_kernels.__version__ not in (ROOT / "setup.py").read_text()
    cli = subprocess.run([sys.executable, "-m", "stm_model", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0
    assert cli.stdout.startswith(f"stm-kernels {stm_kernels.__version__} ")
