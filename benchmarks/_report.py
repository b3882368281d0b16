"""Marked blocks of a Markdown report: each benchmark rewrites its own block and keeps the rest."""

from __future__ import annotations

import sys
from pathlib import Path

from cryoves.io import atomic_write_text


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the block of benchmark ``name`` (e.g. ``"radius_rule.py"``)."""
    return f"<!-- {name} begin -->", f"<!-- {name} end -->"


def block_of(text: str, name: str) -> str | None:
    """The block of ``name`` in ``text``, markers included (None when absent)."""
    b, e = markers(name)
    if b in text and e in text:
        return text[text.index(b):text.index(e) + len(e)]
    return None


def write_block(path: Path, block: str, name: str) -> None:
    """Replace the block of ``name`` in the file at ``path`` by ``block`` (appended when absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    old = block_of(text, name)
    if old is not None:
        a = text.index(old)
        text = text[:a] + block.rstrip("\n") + text[a + len(old):]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text, overwrite=True)


def emit(block: str, report, name: str) -> None:
    """Write ``block`` into the report file (its marked block of ``name``), or print it without one."""
    if report:
        write_block(Path(report), block, name)
        print(f"written {report}", file=sys.stderr)
    else:
        print(block)
