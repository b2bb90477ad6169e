"""Regenerate the example outputs in README.md and docs/*.md by running the documented commands.

    python scripts/regen_doc_outputs.py                 # every marked block, files rewritten in place
    python scripts/regen_doc_outputs.py --check         # run them, print a diff, write nothing (exit 1 if any)
    python scripts/regen_doc_outputs.py --only docs/export.md --workdir /tmp/regen

A page marks the blocks this script owns with an HTML comment on the line before the fence:

``<!-- regen: transcript -->``
    The block is a terminal session: ``$ command`` lines (a trailing ``\\`` continues one)
    each followed by what it printed. Each command runs in turn, in one directory per page,
    and the lines after it are replaced by its output (stdout and stderr, as a terminal shows
    them; ``(exit status N)`` after a failure). A command shown without output stays so: it
    still runs (a later command may need what it made), the page chose not to show it. A
    command must fail where the page shows ``(exit status N)`` and succeed elsewhere, else the
    script stops: the page's story no longer holds.

``<!-- regen: output of COMMAND -->``
    The whole block is COMMAND's standard output (its progress and Ray's logs, on stderr, are
    not shown). COMMAND runs in the page's directory, after the blocks above it.

Commands run with ``bash`` in a fresh directory per page where ``gnaq`` and ``python`` are this
interpreter with this checkout first on ``PYTHONPATH``, and ``configs/``, ``cluster/`` and
``gnaq_dist/`` are links to the repository's; that directory's path is written as a relative
one in the output. Every marked command works on the bundled Last.fm sample or on data an
earlier command of its page made, so a whole run takes a few minutes on 2 cores. Blocks
without a marker (measurements on Gowalla or the synthetic logs at scale, with their dates)
are not touched; the pages say when and where they were measured.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*regen:\s*(transcript|output of\s+(?P<command>.+?))\s*-->\s*$")
LINKED = ("configs", "cluster", "gnaq_dist")

# (command, cwd) -> (exit status, stdout, stderr)
Runner = Callable[[str], "tuple[int, str, str]"]


@dataclass
class Block:
    kind: str  # "transcript" | "output"
    command: str | None  # the "output of" command
    start: int  # index of the first line inside the fence
    end: int  # index of the closing fence


def marked_blocks(lines: list[str]) -> list[Block]:
    """The fenced blocks that follow a regen marker (the marker on the line before the fence)."""
    blocks, i = [], 0
    while i < len(lines):
        match = MARK.match(lines[i].strip())
        if match and i + 1 < len(lines) and lines[i + 1].lstrip().startswith("```"):
            end = next((j for j in range(i + 2, len(lines)) if lines[j].lstrip().startswith("```")), None)
            if end is None:
                raise ValueError(f"line {i + 2}: a regen block without its closing fence")
            kind = "transcript" if match.group(1) == "transcript" else "output"
            blocks.append(Block(kind, match.group("command"), i + 2, end))
            i = end
        elif match:
            raise ValueError(f"line {i + 1}: a regen marker not followed by a fenced block")
        i += 1
    return blocks


def transcript_commands(body: list[str]) -> list[tuple[list[str], bool, bool]]:
    """(the command's lines as printed, whether the page shows its output, whether the page shows
    it failing) for each ``$`` command."""
    commands, i = [], 0
    if body and not body[0].startswith("$ "):
        raise ValueError(f"a transcript starts with a command ('$ ...'), not {body[0]!r}")
    while i < len(body):
        command = [body[i]]
        while command[-1].rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            command.append(body[i])
        i += 1
        shown = i < len(body) and not body[i].startswith("$ ")
        fails = False
        while i < len(body) and not body[i].startswith("$ "):
            fails = fails or body[i].startswith("(exit status ")
            i += 1
        commands.append((command, shown, fails))
    return commands


def shell_text(command_lines: list[str]) -> str:
    return "\n".join(command_lines)[2:]  # without the "$ "


def _format(code: int, out: str, err: str) -> list[str]:
    text = (out + err).rstrip("\n")
    lines = text.splitlines() if text else []
    if code != 0:
        lines.append(f"(exit status {code})")
    return lines


def regenerate(text: str, run: Runner) -> str:
    """``text`` with every marked block's output replaced by what ``run`` gives for its commands."""
    lines = text.splitlines()
    out, last = [], 0
    for block in marked_blocks(lines):
        out += lines[last:block.start]
        body = lines[block.start:block.end]
        if block.kind == "output":
            code, stdout, stderr = run(block.command)
            if code != 0:
                raise RuntimeError(f"{block.command!r} failed (exit {code}):\n{stderr[-3000:]}")
            out += stdout.rstrip("\n").splitlines()
        else:
            for command, shown, fails in transcript_commands(body):
                code, stdout, stderr = run(shell_text(command))
                if (code != 0) != fails:  # a new failure, or a refusal that no longer happens
                    raise RuntimeError(f"{shell_text(command)!r}: exit {code}, the page shows "
                                       f"{'a failure' if fails else 'success'}:\n{(stdout + stderr)[-3000:]}")
                out += command
                if shown:
                    out += _format(code, stdout, stderr)
        last = block.end
    out += lines[last:]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def shell_runner(workdir: Path, timeout: float = 1200) -> Runner:
    """Runs a command with bash in ``workdir`` (set up for it); the directory's path in the output
    becomes relative."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    bin_dir = workdir / ".bin"
    bin_dir.mkdir(exist_ok=True)
    for name, command in (("gnaq", f'exec "{sys.executable}" -m gnaq_dist.cli "$@"'),
                          ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{command}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "TERM": "dumb"})
    prefix = str(workdir.resolve())

    def run(command: str) -> tuple[int, str, str]:
        print(f"[{workdir.name}] $ {command.splitlines()[0][:110]}", file=sys.stderr, flush=True)
        done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)

        def relative(s: str) -> str:
            return s.replace(prefix + "/", "").replace(prefix, ".")

        return done.returncode, relative(done.stdout), relative(done.stderr)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/regen_doc_outputs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="PAGE",
                        help="a page to regenerate (repeatable; default: every page with a marker)")
    parser.add_argument("--check", action="store_true", help="print the differences, write nothing")
    parser.add_argument("--workdir", help="where the commands run, one folder per page (default: a new temp dir)")
    args = parser.parse_args(argv)
    pages = [Path(p).resolve() for p in args.only] or [p for p in PAGES if marked_blocks(p.read_text().splitlines())]
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gnaq-regen-"))
    changed = 0
    for page in pages:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        new = regenerate(text, shell_runner(base / name.replace("/", "_").removesuffix(".md")))
        if new == text:
            print(f"{name}: unchanged")
            continue
        changed += 1
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), name, name))
        else:
            page.write_text(new)
            print(f"{name}: rewritten")
    print(f"commands ran in {base}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
