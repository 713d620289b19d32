"""The README is a guide, not a reference (issue 25, point 2): at most 400 lines, the rest in
``docs/``. Every relative link in README.md and docs/*.md must lead somewhere: to a file of the
repository, and, where it names an anchor, to a heading of that file, with the anchor spelled as
GitHub spells it (lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2`` for repeats).

Links inside fenced code blocks and inline code are not links; absolute URLs (``https:``,
``mailto:``) are not checked (the tests run offline)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 400

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)"
)
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(_CODE_SPAN.sub("", line))
    return lines


def links(text: str) -> list[str]:
    """Every link target of a Markdown text (inline, image and reference links)."""
    found = []
    for line in prose_lines(text):
        found += _INLINE_LINK.findall(line)
        found += _REFERENCE_LINK.findall(line)
    return [target for target in found if target]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (outside code blocks)."""
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path: Path, *, root: Path) -> list[str]:
    """Each relative link of the Markdown file ``path`` that leads nowhere, with why."""
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if _SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = unquote(target).partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not destination.is_relative_to(root.resolve()):
            broken.append(f"{target}: leads outside the repository")
        elif not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md":
            if anchor not in anchors(destination.read_text(encoding="utf-8")):
                broken.append(f"{target}: no heading with anchor #{anchor}")
    return broken


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_guide_of_at_most_400_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(path: Path) -> None:
    assert broken_links(path, root=ROOT) == []


def test_the_readme_links_every_page_of_docs() -> None:
    """What moved out of the README stays reachable from it."""
    linked = {unquote(t).partition("#")[0] for t in links(README.read_text(encoding="utf-8"))}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()


def test_github_anchors() -> None:
    assert slug("Stopping, resuming and exit codes") == "stopping-resuming-and-exit-codes"
    assert slug("`flwr run .` for simulation") == "flwr-run--for-simulation"
    assert slug("1. Install (every host)") == "1-install-every-host"
    assert slug("What is protected, against whom") == "what-is-protected-against-whom"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## B ##\n") == {"a", "a-1", "b"}


def test_the_checker_finds_a_missing_file_a_missing_heading_and_an_escape(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## The part\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Guide\n\n"
        "[ok](docs/page.md), [ok too](docs/page.md#the-part), [here](#guide), "
        "[web](https://example.org/x.md), ![img](docs/page.md)\n"
        "[gone](docs/missing.md) and [no part](docs/page.md#no-such-part) and [out](../x.md)\n"
        "`[in code](docs/missing.md)`\n\n"
        "```\n[in a block](docs/missing.md)\n```\n\n"
        "[ref]: docs/also-missing.md\n",
        encoding="utf-8",
    )
    assert broken_links(readme, root=tmp_path) == [
        "docs/missing.md: no such file",
        "docs/page.md#no-such-part: no heading with anchor #no-such-part",
        "../x.md: leads outside the repository",
        "docs/also-missing.md: no such file",
    ]


_CITED_TEST = re.compile(r"`(test_[a-z0-9_]+)`")


def _setting_names() -> set[str]:
    """Every settings key's last part (``test_fraction`` is a setting, not a test)."""
    import dataclasses

    from fedcore.config import Settings

    names, todo = set(), [Settings()]
    while todo:
        node = todo.pop()
        for f in dataclasses.fields(node):
            names.add(f.name)
            if dataclasses.is_dataclass(value := getattr(node, f.name)):
                todo.append(value)
    return names


def cited_tests(text: str) -> set[str]:
    """Test names a document cites in inline code (`test_...`), settings keys left out."""
    return set(_CITED_TEST.findall(text)) - _setting_names()


def defined_tests(root: Path) -> set[str]:
    """Names of the test functions defined under ``root/tests``."""
    pattern = re.compile(r"^\s*(?:async\s+)?def (test_[a-z0-9_]+)\s*\(", re.MULTILINE)
    return {
        name
        for path in (root / "tests").rglob("test_*.py")
        for name in pattern.findall(path.read_text(encoding="utf-8"))
    }


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_document_cites_exists(path: Path) -> None:
    """A guarantee backed by a test name (the security model) is backed by a test that runs:
    a renamed or deleted test breaks this, not the claim silently."""
    assert cited_tests(path.read_text(encoding="utf-8")) - defined_tests(ROOT) == set()


def test_the_security_model_names_a_test_for_every_guarantee() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**Secure aggregation** (`secagg.*`)") :]
    section = section[: section.index("\n## ")]
    bullets = [b for b in re.split(r"\n- ", section)[1:] if "Simulation runs every party" not in b]
    assert bullets and all(cited_tests(b) for b in bullets), [b[:60] for b in bullets]


def test_the_citation_check_finds_a_missing_test(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_here():\n    pass\n")
    cited = cited_tests("holds (`test_here`), and (`test_gone`)")
    assert cited - defined_tests(tmp_path) == {"test_gone"}
