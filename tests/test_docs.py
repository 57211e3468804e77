"""The user docs point at things that exist: the results files docs/runtime.md cites and the docs README links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_results_file_the_runtime_doc_cites_exists():
    text = (ROOT / "docs" / "runtime.md").read_text()
    cited = set(re.findall(r"`([a-z0-9_]+\.(?:md|json))`", text))
    assert "decode.md" in cited  # the pattern finds the citations
    missing = sorted(name for name in cited if not (ROOT / "benchmarks" / "results" / name).exists())
    assert not missing


def test_readme_links_to_docs_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", text)
    assert links  # the README links the runtime doc
    for path, anchor in links:
        doc = ROOT / path
        assert doc.exists(), path
        if anchor:  # GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens
            heads = [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", doc.read_text(), flags=re.M)]
            assert anchor in heads, (path, anchor)
