"""docs/modules.md is the map of the tree as it is (tools/module_map.py generates it)."""
from tools import module_map


def test_the_committed_module_map_is_current():
    assert module_map.main(["--check"]) == 0, "run python -m tools.module_map"


def test_every_module_is_on_the_map_with_its_docstring():
    text = module_map.document()
    for package in module_map.PACKAGES:
        for path in (module_map.ROOT / package).rglob("*.py"):
            described = module_map.summary(path)
            if described is None and path.name == "__init__.py":
                continue
            assert described is not None, f"{path} has no docstring"
            assert f"- `{path.relative_to(module_map.ROOT)}`: {described}" in text


def test_summary_is_the_first_sentence(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Reads a thing. Then more\nof it.\n\nDetails."""\n')
    assert module_map.summary(module) == "Reads a thing."
    module.write_text("x = 1\n")
    assert module_map.summary(module) is None
