"""Rebuild ``kjv.txt`` from the Debian ``bible-kjv`` packages (documentation of provenance).

This is how the bundled corpus was made; the training run never calls it (it reads
``kjv.txt`` and checks its sha256).  To redo it on a Debian machine:

    apt-get update && apt-get download bible-kjv-text bible-kjv
    for f in bible-kjv*.deb; do dpkg-deb -x "$f" x; done
    x/usr/bin/bible -f -p x/usr/lib gen1:1-rev22:21 > kjv_raw.txt
    python make_corpus.py kjv_raw.txt kjv.txt

``bible -f`` (pretty-printing off) prints one verse per line as ``Ge1:1 In the beginning ...``.
We keep a selection of books (the narrative, poetic and gospel books, about 1.5 MB), drop
the verse numbers, and write each chapter as a heading line ``<Book> <chapter>`` followed by
its verses, one per line, with a blank line between chapters.
"""

from __future__ import annotations

import hashlib
import re
import sys

# (abbreviation used by `bible -f`, name written in the corpus), in canonical order.
BOOKS: list[tuple[str, str]] = [
    ("Ge", "Genesis"),
    ("Exo", "Exodus"),
    ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"),
    ("2Sm", "2 Samuel"),
    ("Est", "Esther"),
    ("Job", "Job"),
    ("Psa", "Psalms"),
    ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"),
    ("Mat", "Matthew"),
    ("Mark", "Mark"),
    ("Luke", "Luke"),
    ("John", "John"),
    ("Acts", "Acts"),
]

_VERSE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def build(raw_lines: list[str]) -> str:
    keep = dict(BOOKS)
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in raw_lines:
        line = line.rstrip("\n")
        if not line:
            continue
        m = _VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected line in bible output: {line[:80]!r}")
        book, chap, text = m.group(1), int(m.group(2)), m.group(4)
        if book not in keep:
            continue
        text = " ".join(text.split())  # collapse stray whitespace
        chapters.setdefault((book, chap), []).append(text)
    order = {abbr: i for i, (abbr, _) in enumerate(BOOKS)}
    parts = []
    for book, chap in sorted(chapters, key=lambda k: (order[k[0]], k[1])):
        parts.append(f"{keep[book]} {chap}\n" + "\n".join(chapters[(book, chap)]) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: make_corpus.py KJV_RAW.txt OUT.txt", file=sys.stderr)
        return 2
    with open(argv[0], encoding="ascii") as f:
        text = build(f.readlines())
    data = text.encode("ascii")
    with open(argv[1], "wb") as f:
        f.write(data)
    print(f"{argv[1]}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
