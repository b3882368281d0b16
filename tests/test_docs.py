"""The documentation runs: every shell command and Python snippet in README.md and docs/*.md.

Fenced blocks marked ``bash``/``sh``/``shell`` run in bash (``set -e``), ``python`` blocks in
Python, each in a fresh subprocess whose working folder is a temporary copy of the repository's
layout (links to ``sample_data/``, ``weights/``, ...), so relative paths resolve as in a clone and
every output lands in the temporary folder. Blocks without a language (file listings, samples)
are not run.

An HTML comment right before a block adjusts it, each adjustment with its reason::

    <!-- test: sub: --epochs 3 => --epochs 1 --steps 2 (a short run) -->
    <!-- test: skip: installs packages (the test environment is already installed) -->

``sub: OLD => NEW (reason)`` replaces text before the block runs (OLD must occur in it);
``skip: reason`` does not run the block. Inline commands (```cryoves segment ... --out DIR```)
in the text are checked against the command line's argument parser.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
#: Entries of the repository linked into the temporary working folder.
LINKED = ("sample_data", "weights", "docs", "tests", "src", "benchmarks", ".ci", "pyproject.toml",
          "napari.yaml", "README.md")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    subs: list = field(default_factory=list)  # (old, new, reason)
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_DIRECTIVE = re.compile(r"(sub|skip):\s*(.*?)\s*(?=(?:\bsub:|\bskip:|$))", re.S)
_SUB = re.compile(r"^(.*?)\s*=>\s*(.*?)\s*\(([^()]+)\)$", re.S)


def _parse_marker(text: str, where: str):
    subs, skip = [], None
    for kind, body in _DIRECTIVE.findall(text):
        if kind == "skip":
            if not body:
                raise ValueError(f"{where}: 'skip:' needs a reason")
            skip = body
        else:
            m = _SUB.match(body)
            if m is None:
                raise ValueError(f"{where}: expected 'sub: OLD => NEW (reason)', got {body!r}")
            subs.append((m.group(1), m.group(2), m.group(3)))
    return subs, skip


def doc_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file with the ``<!-- test: ... -->`` marker before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, marker, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!-- test:"):
            start, buf = i, [line.split("<!-- test:", 1)[1]]
            while "-->" not in buf[-1]:
                i += 1
                buf.append(lines[i])
            buf[-1] = buf[-1].split("-->", 1)[0]
            marker = _parse_marker(" ".join(b.strip() for b in buf), f"{path.name}:{start + 1}")
        elif line.startswith("```"):
            lang = line[3:].strip().lower()
            start, body = i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            subs, skip = marker if marker else ([], None)
            out.append(Block(path, start, lang, "\n".join(body) + "\n", subs, skip))
            marker = None
        elif line.strip():
            marker = None  # a marker applies to the block right after it only
        i += 1
    return out


RUNNABLE = [b for p in DOCS for b in doc_blocks(p) if b.lang in RUN_LANGS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        if (ROOT / name).exists():
            (d / name).symlink_to(ROOT / name)
    return d


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MPLBACKEND"] = "Agg"
    return env


def test_docs_have_runnable_blocks():
    ids = {b.id for b in RUNNABLE}
    assert any(i.startswith("README.md") for i in ids)
    assert len(RUNNABLE) >= 5, ids


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block, workdir):
    if block.skip:
        pytest.skip(block.skip)
    text = block.text
    for old, new, _reason in block.subs:
        assert old in text, f"{block.id}: the marker replaces {old!r}, which is not in the block any more"
        text = text.replace(old, new)
    cmd = (["bash", "-e", "-o", "pipefail", "-c", text] if RUN_LANGS[block.lang] == "bash"
           else [sys.executable, "-c", text])
    out = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, (f"{block.id} failed (exit {out.returncode}):\n{text}\n--- stdout\n"
                                 f"{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}")


_INLINE = re.compile(r"`(cryoves [a-z]+ [^`]+)`")


def inline_commands():
    """Inline ``cryoves COMMAND ARGS`` spans of the docs that are meant literally (no ``...``/``<x>``)."""
    found = []
    for path in DOCS:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for cmd in _INLINE.findall(line):
                if "..." in cmd or "<" in cmd or "COMMAND" in cmd:
                    continue
                found.append(pytest.param(cmd, id=f"{path.relative_to(ROOT)}:{n}"))
    return found


@pytest.mark.parametrize("cmd", inline_commands())
def test_inline_command_is_valid(cmd, capsys):
    from cryoves.cli import build_parser

    argv = shlex.split(cmd)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{cmd!r} is not a valid command: {capsys.readouterr().err.strip()} (exit {exc.code})")


def test_marker_syntax():
    subs, skip = _parse_marker(" sub: a b => c (why) sub: x => (empty) ", "t")
    assert subs == [("a b", "c", "why"), ("x", "", "empty")] and skip is None
    assert _parse_marker("skip: needs a GPU", "t") == ([], "needs a GPU")
    with pytest.raises(ValueError):
        _parse_marker("sub: a => b", "t")  # no reason
