"""Write docs/modules.md: one line per module of the project, from its docstring's first sentence.

    python -m tools.module_map           # rewrite docs/modules.md
    python -m tools.module_map --check   # exit 1 if docs/modules.md is not what the tree gives

The map is generated so that it cannot drift from the tree: a module added, moved or
re-described changes it, and tools/tests/test_module_map.py fails until it is rewritten.
Empty package markers (an __init__.py with no docstring) are left out.
"""
import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "modules.md"
# The packages and what each is for, in the order the map shows them.
PACKAGES = {
    "stm_kernels": "the op library (installed)",
    "stm_model": "the network and everything model-side (installed)",
    "bench": "runtime benchmarks (not installed)",
    "tools": "developer tooling: offline kernel reports, GPU-session scripts (not installed)",
}


def summary(path):
    """The first sentence of a module's docstring, on one line (None without a docstring)."""
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    if not docstring:
        return None
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[:end + 1]


def document():
    """The text of docs/modules.md for the current tree."""
    lines = ["# Module map (generated: `python -m tools.module_map`)", "",
             "One line per module: its path and the first sentence of its docstring.", ""]
    for package, purpose in PACKAGES.items():
        lines += [f"## `{package}/`: {purpose}", ""]
        for path in sorted((ROOT / package).rglob("*.py")):
            text = summary(path)
            if text is None and path.name == "__init__.py":
                continue
            lines.append(f"- `{path.relative_to(ROOT)}`: {text or '(no docstring)'}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = document()
    if args.check:
        if not MAP.exists() or MAP.read_text() != text:
            print("docs/modules.md is stale: run python -m tools.module_map")
            return 1
        return 0
    MAP.write_text(text)
    print(f"wrote {MAP.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
