"""The layer rule of docs/architecture.md's Layers section: a module imports only from its own
layer or below. Every module of stm_kernels, stm_model, bench and tools must be placed in a
layer here (a new module fails until it is), and every import (lazy ones inside functions
included) is checked."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]

# bottom up; a package name stands for all its modules
LAYERS = [
    ("the op", ["stm_kernels"]),
    ("network, memory and building blocks", [
        "stm_model.network", "stm_model.memory", "stm_model.io", "stm_model.runtime",
        "stm_model.metrics", "stm_model.inference.masks", "stm_model.inference.resize",
        "stm_model.interactive.scribbles", "stm_model.training.clip_forward",
        "stm_model.training.synthetic", "stm_model.training.composite",
        # the options declared without torch (the CLI's parsers are built from them)
        "stm_model.inference.options", "stm_model.training.config"]),
    ("segmenters, training and checkpoints", [
        "stm_model.inference", "stm_model.interactive", "stm_model.training",
        "stm_model.network.checkpoint",
        # the ONNX export (of a checkpoint) and its runner (numpy, onnxruntime; no torch)
        "stm_model.export", "stm_model.deploy"]),
    ("CLI, demo, benchmarks and developer tools", [
        "stm_model.cli", "stm_model.commands", "stm_model.annotate", "stm_model.demo",
        "stm_model.__main__", "stm_model", "bench", "tools"]),
]
PACKAGES = ("stm_kernels", "stm_model", "bench", "tools")


def layer_of(module):
    """Index of the layer holding `module` (its most specific entry), or None."""
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (module.startswith(name + ".") and _is_package(name)):
                if best is None or len(name) > len(best[1]):
                    best = (index, name)
    return best and best[0]


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source, module, is_package=False):
    """The project modules the source of `module` imports (absolute and relative, at any
    depth); is_package: the source is the package's __init__.py."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` names a module when pkg/mod.py exists
            names = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def _is_package(name):
    return (ROOT.joinpath(*name.split(".")) / "__init__.py").exists()


def _is_module(name):
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def project_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, module_name(path)


def test_every_module_has_a_layer():
    unplaced = [module for _, module in project_modules() if layer_of(module) is None]
    assert not unplaced, f"place these modules in a layer of {__file__}: {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path, module in project_modules():
        own = layer_of(module)
        for imported in sorted(imported_modules(path.read_text(), module,
                                                path.name == "__init__.py")):
            other = layer_of(imported)
            if other is not None and own is not None and other > own:
                upward.append(f"{module} ({LAYERS[own][0]}) imports {imported} "
                              f"({LAYERS[other][0]})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_relative_lazy_and_package_imports():
    source = ("from .network.stm import STM\nfrom . import io\n"
              "def f():\n    from .inference.video_segmenter import VideoSegmenter\n"
              "    import bench.common\n")
    assert imported_modules(source, "stm_model.example") == {
        "stm_model.network.stm", "stm_model.io", "stm_model.inference.video_segmenter",
        "bench.common"}
    assert imported_modules("from .masks import labels_of\n", "stm_model.inference",
                            is_package=True) == {"stm_model.inference.masks"}
    assert layer_of("stm_model.inference.video_segmenter") > layer_of("stm_model.network.stm")
    assert layer_of("bench.common") == len(LAYERS) - 1
    assert layer_of("stm_kernels.backends.triton.kernels.forward") == 0
    assert layer_of("tools.kernel_report.report") == len(LAYERS) - 1
