"""stm-kernels-onnx: the torch-free distribution of this repository. It installs the `stm`
command and the ONNX runner (stm_model.deploy) with numpy, pillow and onnxruntime, without
PyTorch: `stm segment --runtime onnxruntime --checkpoint FOLDER` on a model exported where
PyTorch is (`stm export MODEL FOLDER`), and `stm eval` with the `eval` extra (docs/deploy.md).

    pip install "/path/to/stm-kernels/stm-kernels-onnx"            # a clone's folder
    pip install "/path/to/stm-kernels/stm-kernels-onnx[video,eval]" # PyAV, scikit-image
    pip wheel "/path/to/stm-kernels/stm-kernels-onnx" -w dist/     # a wheel to copy elsewhere

It carries the modules below, from the repository's own packages (no copies): the ones the
torch-free commands import. Install it or the full stm-kernels, not both (the two provide the
same modules and the same `stm` command, as opencv-python and opencv-python-headless do).
Build it from the folder (pip install / pip wheel), not through an sdist: its sources are the
repository's, one level up.
"""
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent.parent  # the repository

# The modules of the torch-free commands (tests/deploy/test_torch_free_install.py checks that
# none imports torch and that every module they import is here).
TORCH_FREE_MODULES = [
    "stm_kernels.__init__", "stm_kernels._lazy_imports", "stm_kernels._version",
    "stm_kernels.options", "stm_kernels.selftest_options",
    "stm_model.__init__", "stm_model.__main__", "stm_model.cli", "stm_model.metrics",
    "stm_model.commands.__init__", "stm_model.commands.common", "stm_model.commands.evaluate",
    "stm_model.commands.onnx_runtime", "stm_model.commands.segment",
    "stm_model.deploy.__init__", "stm_model.deploy.arrays", "stm_model.deploy.manifest",
    "stm_model.deploy.segmenter",
    "stm_model.inference.__init__", "stm_model.inference.directions",
    "stm_model.inference.masks", "stm_model.inference.options",
    "stm_model.io.__init__", "stm_model.io.annotations", "stm_model.io.files",
    "stm_model.io.frames", "stm_model.io.overlays", "stm_model.io.run_lock",
    "stm_model.memory.__init__", "stm_model.memory.schedule",
    "stm_model.training.__init__", "stm_model.training.config",
]


def _version():
    """The version from stm_kernels/_version.py, read as text (the full distribution's)."""
    text = (ROOT / "stm_kernels" / "_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE).group(1)


setup(
    name="stm-kernels-onnx",
    version=_version(),
    description="The stm command and the ONNX runner of stm-kernels, without PyTorch",
    long_description=__doc__,
    long_description_content_type="text/plain",
    # the packages' sources are the repository's own folders
    package_dir={"stm_kernels": "../stm_kernels", "stm_model": "../stm_model"},
    py_modules=TORCH_FREE_MODULES,
    python_requires=">=3.10",
    install_requires=["numpy", "pillow", "onnxruntime>=1.20", "tqdm"],
    extras_require={
        "video": ["av>=10"],            # video files in and out (frames folders need nothing)
        "eval": ["scikit-image"],       # stm eval's boundary measure F
    },
    entry_points={"console_scripts": ["stm = stm_model.cli:main"]},
)
