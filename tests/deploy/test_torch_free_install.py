"""The torch-free distribution (stm-kernels-onnx/setup.py): its modules import nothing that it
does not carry or depend on, and its wheel, installed into a fresh virtual environment without
PyTorch, runs `stm --help`, `stm --version`, refuses the torch-only commands in one line and
segments a clip with the masks of the torch run."""
import ast
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import synthetic_video, write_davis_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
SETUP = ROOT / "stm-kernels-onnx" / "setup.py"
# what the distribution depends on (install_requires and its extras), besides the standard
# library
DEPENDENCIES = {"numpy", "PIL", "tqdm", "onnxruntime", "av", "skimage"}


def _torch_free_modules():
    """setup.py's TORCH_FREE_MODULES, read without running setup()."""
    for node in ast.parse(SETUP.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "TORCH_FREE_MODULES":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{SETUP} has no TORCH_FREE_MODULES")


def _source(module):
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _import_time_imports(tree, module):
    """(line, imported name) of the imports a module runs when it is imported: its body's,
    into if/try/with/class blocks, not function bodies nor `if TYPE_CHECKING:` blocks."""
    package = module.rpartition(".")[0] if not module.endswith(".__init__") else \
        module[:-len(".__init__")]
    found = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:  # `from pkg import mod` imports pkg.mod
                    name = f"{base}.{alias.name}"
                    found.append((node.lineno, name if _source(name).exists() or
                                  _source(f"{name}.__init__").exists() else base))
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
                visit(node.body)
                for handler in getattr(node, "handlers", ()):
                    visit(handler.body)
    visit(tree.body)
    return found


def test_the_torch_free_modules_import_only_each_other_and_their_dependencies():
    modules = _torch_free_modules()
    missing = [module for module in modules if not _source(module).is_file()]
    assert not missing, f"TORCH_FREE_MODULES names modules that do not exist: {missing}"
    carried = {module[:-len(".__init__")] if module.endswith(".__init__") else module
               for module in modules}
    wrong = []
    for module in modules:
        path = _source(module)
        for line, name in _import_time_imports(ast.parse(path.read_text(), str(path)), module):
            root = name.split(".")[0]
            if root in ("stm_kernels", "stm_model"):
                ok = name in carried
            else:
                ok = root in DEPENDENCIES or root in sys.stdlib_module_names
            if not ok:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, ("modules of the torch-free distribution import, when imported, what it "
                       "neither carries nor depends on (import it inside the function that "
                       "needs it, or add the module to TORCH_FREE_MODULES):\n" + "\n".join(wrong))


def test_the_checker_sees_import_time_imports_only():
    source = ("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
              "try:\n    import av\nexcept ImportError:\n    import numpy\n"
              "def f():\n    import scipy\nclass C:\n    from . import options\n")
    names = [name for _, name in _import_time_imports(ast.parse(source),
                                                      "stm_kernels.example")]
    assert names == ["os", "typing", "av", "numpy", "stm_kernels.options"]


def _run(command, cwd, timeout=300):
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _masks(folder):
    from stm_model import io as video_io
    return [video_io.read_mask(path) for path in sorted((folder / "masks").glob("*.png"))]


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory):
    """The python of a fresh virtual environment (no PyTorch) with the stm-kernels-onnx wheel
    installed, its dependencies from the package index (skipped when it cannot be reached)."""
    work = tmp_path_factory.mktemp("torch-free")
    probe = _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest",
                  work / "probe", "onnxruntime"], work, timeout=180)
    if probe.returncode != 0:
        pytest.skip(f"cannot reach the package index: {probe.stderr.strip()[-300:]}")
    # the distribution's folder and the packages it takes its modules from, as a clone has them
    clone = work / "stm-kernels"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pt")
    for name in ("stm-kernels-onnx", "stm_kernels", "stm_model"):
        shutil.copytree(ROOT / name, clone / name, ignore=ignore)
    built = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                  "--no-build-isolation", clone / "stm-kernels-onnx", "-w", work / "dist"], work)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel, = (work / "dist").glob("stm_kernels_onnx-*.whl")
    environment = work / "venv"
    made = _run([sys.executable, "-m", "venv", environment], work)
    assert made.returncode == 0, made.stderr
    python = environment / "bin" / "python"
    installed = _run([python, "-m", "pip", "install", "--quiet", wheel], work, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


_API = """
import sys
from stm_model.io import FrameReader, read_mask
from stm_model.deploy import OnnxSegmenter
import stm_kernels
assert "torch" not in sys.modules
try:
    stm_kernels.memory_read
except ImportError as error:
    print(error)
"""


def test_the_wheel_runs_the_command_without_pytorch(torch_free_python, tmp_path):
    python, stm = torch_free_python, torch_free_python.parent / "stm"
    no_torch = _run([python, "-c", "import torch"], tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    helped = _run([stm, "--help"], tmp_path)
    assert helped.returncode == 0 and "segment" in helped.stdout, helped.stderr
    version = _run([stm, "--version"], tmp_path)
    assert version.returncode == 0 and "no PyTorch; onnxruntime" in version.stdout, version
    for argv in (["train", "--steps", "1"], ["selftest"], ["export", "small-real", "x/"],
                 ["segment-dataset", str(tmp_path), "--output", str(tmp_path / "o")]):
        refused = _run([stm, *argv], tmp_path)
        assert refused.returncode == 2, (argv, refused.stdout, refused.stderr)
        assert refused.stderr.count("\n") == 1 and "needs PyTorch" in refused.stderr
        assert "Traceback" not in refused.stderr
    # the Python API's reader and runner import no torch either
    api = _run([python, "-c", _API], tmp_path)
    assert api.returncode == 0 and "stm_kernels.memory_read needs PyTorch" in api.stdout, api


def test_the_wheel_segments_a_clip_as_the_torch_run(torch_free_python, tmp_path):
    from stm_model import FrameSequence, VideoSegmenter, load_checkpoint
    from stm_model import io as video_io
    from stm_model.cli import main
    images, labels = synthetic_video(8, size=(96, 128), objects=2)
    write_davis_folder(tmp_path / "clip", images, labels)
    frames = tmp_path / "clip" / "JPEGImages" / "480p" / "synth"
    mask = tmp_path / "clip" / "Annotations" / "480p" / "synth" / "00000.png"
    exported = tmp_path / "small-real-onnx"
    assert main(["export", "small-real", str(exported)]) == 0  # where torch is
    common = ["segment", frames, "--mask", mask, "--overlay", "png", "--quiet"]
    stm = torch_free_python.parent / "stm"
    # not given: the runtime is onnxruntime, there being no torch; a model name is refused
    unexported = _run([stm, *common, "--output", tmp_path / "none"], tmp_path)
    assert unexported.returncode == 2 and "needs an exported model" in unexported.stderr
    torch_runtime = _run([stm, *common, "--runtime", "torch", "--output", tmp_path / "none"],
                         tmp_path)
    assert torch_runtime.returncode == 2 and "needs PyTorch" in torch_runtime.stderr
    run = _run([stm, *common, "--checkpoint", exported, "--output", tmp_path / "torch-free"],
               tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "device: onnxruntime (CPU)" in run.stdout
    assert len(list((tmp_path / "torch-free" / "overlay").glob("*.png"))) == 8
    assert main([*map(str, common), "--runtime", "onnxruntime", "--checkpoint", str(exported),
                 "--output", str(tmp_path / "onnx-here")]) == 0
    assert main([*map(str, common), "--runtime", "torch", "--memory-dtype", "fp32", "--amp",
                 "fp32", "--output", str(tmp_path / "torch")]) == 0
    torch_free, onnx_here = _masks(tmp_path / "torch-free"), _masks(tmp_path / "onnx-here")
    assert len(torch_free) == 8
    for a, b in zip(torch_free, onnx_here, strict=True):  # the same graphs, the same runner
        np.testing.assert_array_equal(a, b)
    # against the torch run in float32 (network and memory): equal but where two objects'
    # probabilities tie within float32 rounding (the runtimes' convolutions round differently)
    segmenter = VideoSegmenter(load_checkpoint("small-real"), memory_dtype="fp32")
    first = video_io.read_mask(mask)
    differing = 0
    for frame, torch_labels, labels_t in zip(FrameSequence(frames).range(0, 8),
                                             _masks(tmp_path / "torch"), torch_free,
                                             strict=True):
        probs = segmenter.step(frame.array, mask=first if frame.index == 0 else None)
        np.testing.assert_array_equal(segmenter.labels(probs).numpy(), torch_labels)
        top = np.sort(probs.numpy(), axis=0)
        where = labels_t != torch_labels
        differing += int(where.sum())
        assert (top[-1] - top[-2])[where].max(initial=0) <= 1e-3, frame.index
    assert differing <= 8
