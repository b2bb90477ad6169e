"""Every `gnaq <verb> ... --flag` in a shell block of README.md and docs/*.md names a flag that
`gnaq <verb>`'s argparse parser (gnaq_dist/cli.py) has: documented commands cannot drift from
the command line. Shell blocks are the ```bash / ```sh / ```shell / ```console ones and the
unlabelled ones; a command may be continued with a backslash, sit after `$ `, inside quotes
(`sh -c "gnaq ingest ... && gnaq train ..."`, `ray exec ... "gnaq train ..."`) or after a pipe."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}
GNAQ_ENTRY = re.compile(r"(?:^|/)gnaq$")


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of each fenced block in a shell language (or none)."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, start, body = fence.group(1).lower(), number + 1, []
        elif fence:
            if lang in SHELL_LANGS:
                blocks.append((start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def logical_lines(body: str, start: int) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined; a leading `$ ` prompt dropped."""
    out, pending, first = [], "", start
    for number, line in enumerate(body.splitlines(), start):
        if not pending:
            first = number
            line = re.sub(r"^\s*\$\s", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


WRAPPERS = {"time", "nice", "exec", "sudo", "nohup", "--", "$"}


def _at_command_position(tokens: list[str], i: int) -> bool:
    if i == 0:
        return True
    before = tokens[i - 1]
    return (before in OPERATORS or set(before) <= set("&|;<>") or before in WRAPPERS
            or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", before) is not None)


def gnaq_commands(line: str) -> list[list[str]]:
    """Each `gnaq ...` (or `python -m gnaq_dist.cli ...`) invocation in a shell line, as argv
    after the program name, up to the next shell operator; quoted strings are searched too.
    A `gnaq` that is not where a command starts (`--method gnaq`) is a word, and `gnaq train:`
    (a colon after the verb) is an output line."""
    try:
        tokens = _tokens(line)
    except ValueError:  # unbalanced quotes: output, not a command
        return []
    commands, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        program = GNAQ_ENTRY.search(token) is not None and _at_command_position(tokens, i)
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "gnaq_dist.cli":
            program, i = True, i + 1
        if program:
            argv = []
            for t in tokens[i + 1:]:
                if t in OPERATORS or set(t) <= set("&|;<>"):
                    break
                argv.append(t.strip("[]()") if t.startswith(("[", "(")) else t)  # a synopsis: [--seed S]
            if argv and not argv[0].startswith("-") and not re.fullmatch(r"[a-z]+", argv[0]):
                return []  # "gnaq train: error: ...": what a command printed
            commands.append(argv)
            i += len(argv)
        elif " " in token and "gnaq" in token:  # a quoted command line: sh -c "...", ray exec "..."
            commands += gnaq_commands(token)
        i += 1
    return commands


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for start, body in shell_blocks(doc.read_text()):
            for number, line in logical_lines(body, start):
                for argv in gnaq_commands(line):
                    found.append((f"{doc.relative_to(ROOT)}:{number}", argv))
    return found


def _parsers():
    from gnaq_dist.cli import build_parser

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices


def unknown_flags(argv: list[str], parser, verbs: dict) -> list[str]:
    """The flags of ``argv`` that its parser lacks (an unknown verb is reported as such)."""
    if not argv or argv[0].startswith("-"):
        target, rest = parser, argv
    else:
        if argv[0] not in verbs:
            return [f"unknown command {argv[0]!r}"]
        target, rest = verbs[argv[0]], argv[1:]
    known = set(target._option_string_actions)
    bad = []
    for token in rest:
        if not token.startswith("-") or token == "-" or re.fullmatch(r"-\d[\d.]*", token):
            continue
        flag = token.split("=", 1)[0] if token.startswith("--") else token
        if flag.startswith("-") and not flag.startswith("--") and len(flag) > 2 and flag[:2] in known:
            continue  # -k5 style
        if flag not in known:
            bad.append(flag)
    return bad


def test_the_docs_have_gnaq_commands_to_check():
    commands = documented_commands()
    verbs = {argv[0] for _, argv in commands if argv}
    assert {"ingest", "train", "export", "recommend", "evaluate", "reproduce", "generate"} <= verbs
    assert len(commands) > 40
    where = {w.split(":")[0] for w, _ in commands}
    assert "README.md" in where and "docs/quickstart.md" in where


def test_every_documented_flag_exists():
    parser, verbs = _parsers()
    problems = []
    for where, argv in documented_commands():
        bad = unknown_flags(argv, parser, verbs)
        if bad:
            problems.append(f"{where}: gnaq {' '.join(argv)[:100]}: {', '.join(bad)}")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("line, expected", [
    ("gnaq train --dataset d --out o", [["train", "--dataset", "d", "--out", "o"]]),
    ('$ gnaq export a b   # a comment --nope', [["export", "a", "b"]]),
    ('sh -c "gnaq ingest x y --no-progress && gnaq train --address auto"',
     [["ingest", "x", "y", "--no-progress"], ["train", "--address", "auto"]]),
    ("time .venv/bin/gnaq recommend b --user 1 | head -3", [["recommend", "b", "--user", "1"]]),
    ("python -m gnaq_dist.cli evaluate c --json", [["evaluate", "c", "--json"]]),
    ("gnaq-dist is installed", []),
    ("gnaq generate OUT --users U [--seed S] [--row-group-rows N]",
     [["generate", "OUT", "--users", "U", "--seed", "S]", "--row-group-rows", "N]"]]),
    ("gnaq train --method gnaq --bits 2", [["train", "--method", "gnaq", "--bits", "2"]]),
    ("gnaq train: error: --out s3://x: cannot write there", []),
    ("ray job submit --address http://h:8265 -- gnaq train --address auto", [["train", "--address", "auto"]]),
    ("A=1 gnaq evaluate --popularity --dataset d", [["evaluate", "--popularity", "--dataset", "d"]]),
])
def test_commands_are_found_in_shell_lines(line, expected):
    assert gnaq_commands(line) == expected


def test_an_unknown_flag_is_caught():
    parser, verbs = _parsers()
    assert unknown_flags(["train", "--dataset", "d", "--epochz", "3", "--set=a=1"], parser, verbs) == ["--epochz"]
    assert unknown_flags(["recommend", "b", "-k", "5", "--user", "1"], parser, verbs) == []
    assert unknown_flags(["trian"], parser, verbs) == ["unknown command 'trian'"]
    assert unknown_flags(["--version"], parser, verbs) == []
