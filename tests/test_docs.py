"""The documentation covers every registered method and points at nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import weightweaving

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "docs" / "algorithms.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Markdown links [text](target) and bare mentions of the out-of-repository specification.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def documented_methods() -> set[str]:
    return set(re.findall(r"^### `([a-z0-9_]+)`\s*$", ALGORITHMS.read_text(encoding="utf-8"), re.MULTILINE))


@pytest.mark.parametrize("name", weightweaving.list_methods())
def test_every_registered_method_has_a_section(name: str) -> None:
    assert name in documented_methods(), f"docs/algorithms.md has no '### `{name}`' section"


def test_the_documents_exist() -> None:
    assert ALGORITHMS.is_file()
    assert len(DOCUMENTS) >= 2


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    assert "../" not in text, f"{document.name} refers to a path above the repository"
    assert "shared/ALGORITHMS.md" not in text and "shared/oracles" not in text


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(document: Path) -> None:
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor within the page
        path = (document.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{document.name}: link '{target}' leaves the repository"
        assert path.exists(), f"{document.name}: link '{target}' points at nothing"


def test_link_checker_sees_links() -> None:
    """Guard for the checker itself: it finds relative links and would flag one that leaves the repo."""
    found = LINK.findall("see [the spec](docs/algorithms.md#ties) and [x](../elsewhere/SPEC.md)")
    assert found == ["docs/algorithms.md#ties", "../elsewhere/SPEC.md"]
