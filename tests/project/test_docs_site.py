"""The documentation site (mkdocs.yml, `make docs`): it builds in strict mode (no broken link,
no docstring the API pages cannot read), every page of docs/ is in its navigation, and the API
pages hold the public functions and classes."""
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_page_is_in_the_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, re.M))
    pages = {str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md")}
    assert pages == listed, (pages - listed, listed - pages)


def test_the_site_builds_strictly_with_the_api_pages(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                                "--site-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    api = {name: (tmp_path / "api" / name / "index.html").read_text()
           for name in ("stm_kernels", "stm_model")}
    for anchor in ("stm_kernels.memory_read.memory_read", "stm_kernels.merge_reads",
                   "stm_kernels.distributed.memory_read", "stm_kernels.selftest.run"):
        assert f'id="{anchor}"' in api["stm_kernels"], anchor
    for anchor in ("stm_model.VideoSegmenter", "stm_model.BatchSegmenter",
                   "stm_model.InteractiveSession", "stm_model.load_official_checkpoint",
                   "stm_model.inference.options.SegmenterOptions", "stm_model.io.read_mask",
                   "stm_model.metrics"):
        assert f'id="{anchor}' in api["stm_model"], anchor
    # the home page is the README, its links to docs/ rewritten to the site's pages
    home = (tmp_path / "index.html").read_text()
    assert "make demo" in home and 'href="op/"' in home
