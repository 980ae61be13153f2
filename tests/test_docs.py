"""The documentation's cross-references: every `§N` / `§N.M` that a Python file of the repository cites names a heading
of docs/method.md, every relative link in README.md and docs/*.md reaches a file, and nothing points at material
outside the repository."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = os.path.join(ROOT, "docs", "method.md")
SKIP_DIRS = {"__pycache__", "runs", "node_modules"}
# Spelled in pieces so that this file does not mention them itself.
OUTSIDE = ("../" + "shared", "shared" + "/reference", "tdm-method" + ".md")
CITATION = re.compile(r"§(\d+)(?:\.(\d+))?(?:[-–](\d+))?")           # section 9, 3.2, a range 5-7
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(\S+)|<img[^>]*\bsrc=\"([^\"]+)\"", re.M)


def repository_files(*extensions):
    """Files of the repository with these extensions (hidden folders, caches and run folders skipped), relative."""
    found = []
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        found += [os.path.relpath(os.path.join(root, f), ROOT) for f in sorted(files) if f.endswith(extensions)]
    return found


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def method_sections():
    """{'1', ..., '13'} and {'3.2', ...}: the `## N.` and `### N.M` headings of docs/method.md."""
    text = read(METHOD)
    return set(re.findall(r"^## (\d+)\.", text, re.M)) | {f"{a}.{b}" for a, b in
                                                        re.findall(r"^### (\d+)\.(\d+)\b", text, re.M)}


def citations(text):
    """The sections a text cites, as strings: section 9 -> ['9'], 3.2 -> ['3.2'], the range 5-7 -> ['5', '6', '7']."""
    out = []
    for major, minor, last in CITATION.findall(text):
        if minor:
            out.append(f"{major}.{minor}")
        else:
            out += [str(n) for n in range(int(major), int(last or major) + 1)]
    return out


def test_citation_parser():
    S = "\u00a7"                                                  # the section sign (not written out: this file is scanned)
    assert citations(f"docs/method.md {S}9; {S}3.2, {S}5-7 and {S}12.") == ["9", "3.2", "5", "6", "7", "12"]
    assert {str(n) for n in range(1, 14)} <= method_sections()


def test_every_section_cited_in_the_code_exists():
    sections = method_sections()
    cited = {(rel, n) for rel in repository_files(".py") for n in citations(read(rel))}
    assert {rel.split(os.sep)[0] for rel, _ in cited} >= {"tdm.py", "tests"}       # the scan sees both places
    missing = sorted(f"{rel}: §{n}" for rel, n in cited if n not in sections)
    assert not missing, f"cited sections with no heading in docs/method.md: {missing}"


def broken_links(root, md_files):
    """(relative links checked, '<file>: <target>' of those whose file does not exist) in these markdown files."""
    broken, checked = [], 0
    for rel in md_files:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()
        for groups in LINK.findall(text):
            target = next(g for g in groups if g)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue                                        # http(s), mailto, ... and same-page anchors
            path = target.split("#")[0].split("?")[0]
            checked += 1
            if not os.path.exists(os.path.normpath(os.path.join(root, os.path.dirname(rel), path))):
                broken.append(f"{rel}: {target}")
    return checked, broken


def test_link_checker(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("[ok](../README.md#top) ![img](b.png \"t\") [web](https://x.org) [here](#s)\n"
                                            "[gone](missing.md) <img src=\"c.png\">\n[ref]: b.png\n")
    (tmp_path / "README.md").write_text("")
    (tmp_path / "docs" / "b.png").write_bytes(b"")
    assert broken_links(str(tmp_path), [os.path.join("docs", "a.md")]) == (5, ["docs/a.md: missing.md",
                                                                             "docs/a.md: c.png"])


def test_relative_links_resolve():
    docs = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if f.endswith(".md")]
    checked, broken = broken_links(ROOT, docs)
    assert checked >= 10 and not broken, broken


@pytest.mark.parametrize("needle", OUTSIDE)
def test_nothing_points_outside_the_repository(needle):
    files = repository_files(".py", ".md")
    assert "README.md" in files and os.path.join("tests", "test_docs.py") in files
    assert not [rel for rel in files if needle in read(rel)]
