"""Rewrite references to the project's former out-of-tree documents into docs/ references.

    python tools/rewrite_doc_refs.py [--check]

Every tracked text file outside docs/ is rewritten in place: the maths specification becomes
docs/math.md, the performance document docs/performance.md and the CuPy notes
docs/architecture.md, section numbers kept (docs/math.md and docs/performance.md keep the
original numbering). Idempotent: a second run changes nothing. ``--check`` only lists the files
that would change and exits 1 if there are any. tests/test_docs.py enforces the result.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The old names are assembled so that this file never mentions them literally (the script must be
# a fixed point of itself, and tests/test_docs.py scans it like every other tracked file).
_SPEC, _PERF, _CUPY = "MLSTM" + "_SPEC", "PERFORMANCE", "CUPY" + "_NOTES"

RULES = [
    # a relative path to the former spec folder, with or without leading ../
    (re.compile(rf"(?:\.\./)*(?:shared/)?spec/{_SPEC}\.md"), "docs/math.md"),
    (re.compile(rf"(?:\.\./)*(?:shared/)?spec/{_PERF}\.md"), "docs/performance.md"),
    (re.compile(rf"(?:\.\./)*(?:shared/)?spec/{_CUPY}\.md"), "docs/architecture.md"),
    # bare names, with or without .md ("<spec> §6.4", "<spec>.md §6")
    (re.compile(rf"(?<![\w/.]){_SPEC}(?:\.md)?(?!\w)"), "docs/math.md"),
    (re.compile(rf"(?<![\w/.]){_PERF}\.md(?!\w)"), "docs/performance.md"),
    (re.compile(rf"(?<![\w/.]){_PERF}(?= §)"), "docs/performance.md"),
    (re.compile(rf"(?<![\w/.]){_CUPY}(?:\.md)?(?!\w)"), "docs/architecture.md"),
]


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return [REPO / p for p in out.decode().split("\0") if p and not p.startswith("docs/")]


def rewrite(text):
    for pattern, repl in RULES:
        text = pattern.sub(repl, text)
    return text


def main(argv=None):
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    changed = []
    for path in tracked_files():
        if not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" in raw:
            continue  # binary
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        new = rewrite(text)
        if new != text:
            changed.append(path.relative_to(REPO))
            if not check:
                path.write_text(new, encoding="utf-8")
    for p in changed:
        print(p)
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
