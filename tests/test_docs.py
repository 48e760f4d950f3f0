"""The documentation ships with the code: no tracked file outside docs/ cites a document that is
not in the repository, every "docs/<name>.md §N" reference names an existing file and section,
and the relative links inside docs/ resolve."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

# The former out-of-tree documents, assembled so that this file does not mention them literally
# (the two distinctive stems also without ".md").
FORMER = ("MLSTM" + "_SPEC", "PERFORMANCE" + ".md", "CUPY" + "_NOTES")

_HEADING = re.compile(r"^#{2,4} (\d+[a-z]?(?:\.\d+)*)\.? ", re.M)
_SECTION = r"§\d+[a-z]?(?:\.\d+)*(?:[-–]\d+[a-z]?(?:\.\d+)*)?"
_REF = re.compile(rf"docs/([\w-]+\.md)((?:(?:,\s*|\s+and\s+|\s+)(?:{_SECTION}))*)")
_LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = {}
    for rel in out.decode().split("\0"):
        path = REPO / rel
        if not rel or not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" not in raw:
            files[rel] = raw.decode("utf-8", errors="replace")
    return files


def sections(name):
    """Section numbers ("1.2", "3b", "6") of docs/<name>, from its headings."""
    return set(_HEADING.findall((DOCS / name).read_text()))


def references(text):
    """(file, [section numbers]) for every docs/<file>.md reference in text."""
    out = []
    for m in _REF.finditer(text):
        secs = []
        for s in re.findall(_SECTION, m.group(2)):
            secs += re.split(r"[-–]", s[1:])
        out.append((m.group(1), secs))
    return out


def test_docs_exist():
    for name in ("index.md", "api.md", "math.md", "architecture.md", "performance.md", "distributed.md"):
        assert (DOCS / name).is_file(), name


def test_index_lists_every_document():
    index = (DOCS / "index.md").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and f"]({p.name})" not in index]
    assert not missing, missing


#: How the work was organised is not what the documentation describes (which machines were or were
#: not available, which run produced a number): say what was measured, on which card, when, and
#: what has not been run. (The words are spelled with character classes so that this file does
#: not itself contain them.)
_CIRCUMSTANCES = re.compile(r"\bl[e]nt\b|\bs[e]ssions?\b|\bs\d+call\d+|\bcall \d+\b|d[e]vice time|d[e]vice call"
                            r"|freshly started|a later s[e]ssion", re.I)


def test_readme_docs_and_bench_speak_of_the_project_only():
    files = tracked_text_files()
    bad = []
    for rel, text in files.items():
        if rel == "README.md" or rel.startswith(("docs/", "bench/")):
            bad += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                    if _CIRCUMSTANCES.search(line)]
    assert not bad, "\n".join(bad)


def test_math_keeps_the_section_numbers_code_cites():
    have = sections("math.md")
    needed = {str(n) for n in range(15)} | {f"{a}.{b}" for a, n in ((1, 6), (2, 3), (4, 5), (5, 6), (6, 6),
                                                                    (11, 3)) for b in range(1, n + 1)}
    assert needed <= have, sorted(needed - have)
    assert {"1", "2", "2a", "2b", "3", "3b", "4", "5", "6", "7", "8"} <= sections("performance.md")


def test_no_tracked_file_outside_docs_cites_a_former_document():
    offenders = {rel: [n for n in FORMER if n in text] for rel, text in tracked_text_files().items()
                 if not rel.startswith("docs/")}
    offenders = {rel: names for rel, names in offenders.items() if names}
    assert not offenders, f"cite docs/ instead (python tools/rewrite_doc_refs.py rewrites them): {offenders}"


def test_every_docs_reference_points_to_an_existing_file_and_section():
    bad = []
    for rel, text in tracked_text_files().items():
        for name, secs in references(text):
            if not (DOCS / name).is_file():
                bad.append(f"{rel}: docs/{name} does not exist")
                continue
            have = sections(name)
            bad += [f"{rel}: docs/{name} §{s} has no such section" for s in secs if s not in have]
    assert not bad, "\n".join(bad)


def test_reference_parser_sees_lists_and_ranges():
    assert references("see docs/math.md §2-4, §6.4 and §7; docs/performance.md §3b") == [
        ("math.md", ["2", "4", "6.4", "7"]), ("performance.md", ["3b"])]


def anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_relative_links_and_anchors_inside_docs_resolve():
    bad = []
    for page in DOCS.glob("*.md"):
        for target, anchor in _LINK.findall(page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                bad.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                bad.append(f"{page.name}: {target}#{anchor}")
    assert not bad, bad


def test_rewrite_script_is_a_fixed_point_of_the_tree():
    """tools/rewrite_doc_refs.py (re-run after merges) changes nothing in the tree as it stands,
    itself and this file included, and rewrites the forms it exists for."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("rewrite_doc_refs", REPO / "tools" / "rewrite_doc_refs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    changed = [rel for rel, text in tracked_text_files().items()
               if not rel.startswith("docs/") and mod.rewrite(text) != text]
    assert not changed, changed
    spec_name, perf, notes = FORMER
    assert mod.rewrite(f"(../shared/spec/{spec_name}.md §6.6)") == "(docs/math.md §6.6)"
    assert mod.rewrite(f"{spec_name} §2.2, {perf} §3b, ../spec/{notes}.md") == \
        "docs/math.md §2.2, docs/performance.md §3b, docs/architecture.md"
