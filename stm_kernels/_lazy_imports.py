"""The packages' names imported on first use (PEP 562), and the one message for a name that
needs PyTorch where it is not installed (the torch-free distribution, stm-kernels-onnx)."""
import importlib
import importlib.util

TORCH_MISSING = ("needs PyTorch, which is not installed here: install PyTorch "
                 "(https://pytorch.org), then the full stm-kernels (pip install "
                 "/path/to/stm-kernels); without PyTorch, `stm segment --runtime onnxruntime "
                 "--checkpoint FOLDER` and stm_model.deploy run an exported model "
                 "(docs/deploy.md)")


def torch_available() -> bool:
    """Whether PyTorch can be imported here (found without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ValueError, ImportError):  # sys.modules["torch"] = None: imports of it fail
        return False


def import_module(module: str, what: str):
    """importlib.import_module(module); where PyTorch is not installed, an ImportError in one
    line saying that `what` (the name asked for) needs it, instead of the missing module."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if torch_available():
            raise
        raise ImportError(f"{what} {TORCH_MISSING}") from error
