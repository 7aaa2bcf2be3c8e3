"""The repository is self-contained: its docs live in docs/, and every pointer to them resolves.

Comments and docstrings may point at docs/<file>.md#<anchor>; a pointer at a document that is not in the
repository (notes kept elsewhere while the code was written) helps no reader, so none may remain.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("numerics.md", "architecture.md", "performance.md")

# Documents that are not in the repository. Spelled in pieces so that this file does not match itself.
OUTSIDE = (
    "ncsn_" + "reference",
    "design/" + "API.md",
    "ARCHITECTURE" + ".md",
    "PERFORMANCE" + ".md",
    "../" + "shared",
)
SECTION_MARK = re.compile("\N{SECTION SIGN}" + r"\s*\d")  # "section 5.3" marks of those documents
DOC_POINTER = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)(?:#([A-Za-z0-9_-]+))?")
RELATIVE_LINK = re.compile(r"\]\(([A-Za-z0-9_.-]+\.md)?#([A-Za-z0-9_-]+)\)")  # inside docs/: [text](page.md#a)


def repository_text_files() -> dict[str, str]:
    """Path -> text of every file git tracks, or would track (untracked but not ignored), that is text."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            timeout=120,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (or git is missing): nothing to scan")
    files = {}
    for name in sorted(set(listing.decode().split("\0")) - {""}):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text: lowercase, punctuation dropped, spaces to
    hyphens, a repeated heading suffixed -1, -2, ...; headings inside fenced code blocks do not count."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link counts by its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_the_docs_exist():
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        assert text.startswith("# "), f"docs/{page} should open with its title"


def test_no_pointer_outside_the_repository():
    found = []
    for name, text in repository_text_files().items():
        for lineno, line in enumerate(text.splitlines(), 1):
            hits = [p for p in OUTSIDE if p in line] + SECTION_MARK.findall(line)
            if hits:
                found.append(f"{name}:{lineno}: {', '.join(hits)}: {line.strip()[:100]}")
    assert not found, "pointers at documents that are not in the repository:\n" + "\n".join(found)


def test_every_docs_pointer_resolves():
    anchors = {page.name: github_anchors(page.read_text(encoding="utf-8")) for page in DOCS.glob("*.md")}
    broken, pointers = [], 0
    for name, text in repository_text_files().items():
        targets = [(m.group(1), m.group(2)) for m in DOC_POINTER.finditer(text)]
        if name.startswith("docs/") and name.endswith(".md"):
            here = name.removeprefix("docs/")
            targets += [(m.group(1) or here, m.group(2)) for m in RELATIVE_LINK.finditer(text)]
        for page, anchor in targets:
            pointers += 1
            if page not in anchors:
                broken.append(f"{name}: docs/{page} does not exist")
            elif anchor is not None and anchor not in anchors[page]:
                broken.append(f"{name}: docs/{page} has no heading with the anchor #{anchor}")
    assert not broken, "\n".join(sorted(set(broken)))
    assert pointers > 0, "no docs/ pointer found: is the scan reading the repository?"


def test_the_anchor_rule():
    """The anchors follow GitHub's rule, so that a pointer that passes here works on GitHub too."""
    text = "# Numerics: the originals\n## Where fastscore differs, and why\n"
    text += "```\n# not a heading\n```\n## InstanceNorm++\n"
    text += "## The final normaliser quirk\n## The final normaliser quirk\n"
    assert github_anchors(text) == {
        "numerics-the-originals",
        "where-fastscore-differs-and-why",
        "instancenorm",
        "the-final-normaliser-quirk",
        "the-final-normaliser-quirk-1",
    }
