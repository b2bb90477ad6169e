"""scripts/regen_doc_outputs.py: the marked example outputs of README.md and docs/*.md are
rewritten from the commands the pages show (here with cheap commands; the real run is the
script itself, a few minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


regen = load_script("scripts/regen_doc_outputs.py")

PAGE = """# A page

<!-- regen: output of printf 'a\\nb\\n' -->
```
old output
```

Some prose.

<!-- regen: transcript -->
```console
$ mkdir d && echo made \\
    d
old
$ touch d/x
$ ls d        # a comment stays
old listing
$ ls nope
old error
(exit status 1)
```

```
an unmarked block stays as it is
```
"""


def test_marked_blocks_are_rewritten_from_their_commands(tmp_path):
    run = regen.shell_runner(tmp_path / "work")
    new = regen.regenerate(PAGE, run)
    assert new == PAGE.replace("old output", "a\nb").replace("made \\\n    d\nold", "made \\\n    d\nmade d").replace(
        "old listing", "x").replace("old error\n(exit status 1)", "ls: cannot access 'nope': No such file or directory\n(exit status 2)")
    assert (tmp_path / "work" / "d" / "x").exists()  # a command shown without output ran too
    assert regen.regenerate(new, regen.shell_runner(tmp_path / "again")) == new


def test_the_work_directory_is_written_as_a_relative_path(tmp_path):
    work = tmp_path / "work"
    page = "<!-- regen: transcript -->\n```\n$ echo $PWD/runs/x; echo $PWD\nold\n```\n"
    assert regen.regenerate(page, regen.shell_runner(work)) == "<!-- regen: transcript -->\n```\n" \
        "$ echo $PWD/runs/x; echo $PWD\nruns/x\n.\n```\n"
    assert (work / "gnaq_dist").resolve() == ROOT / "gnaq_dist"  # the documented relative paths work there


def test_gnaq_in_the_work_directory_is_this_checkout(tmp_path):
    page = "<!-- regen: transcript -->\n```\n$ gnaq --version\nold\n```\n"
    new = regen.regenerate(page, regen.shell_runner(tmp_path))
    assert new.splitlines()[3].startswith("gnaq ")


def test_a_failing_output_command_stops_the_script(tmp_path):
    with pytest.raises(RuntimeError, match="exit 3"):
        regen.regenerate("<!-- regen: output of exit 3 -->\n```\nx\n```\n", regen.shell_runner(tmp_path))
    with pytest.raises(RuntimeError, match="false"):  # a hidden output would hide the failure
        regen.regenerate("<!-- regen: transcript -->\n```\n$ false\n$ echo\nx\n```\n", regen.shell_runner(tmp_path))
    with pytest.raises(RuntimeError, match="the page shows success"):  # shown, but the page shows it working
        regen.regenerate("<!-- regen: transcript -->\n```\n$ ls nope\nnope\n```\n", regen.shell_runner(tmp_path))
    with pytest.raises(RuntimeError, match="the page shows a failure"):  # a refusal that no longer happens
        regen.regenerate("<!-- regen: transcript -->\n```\n$ true\n(exit status 2)\n```\n",
                         regen.shell_runner(tmp_path))


@pytest.mark.parametrize("page, message", [
    ("<!-- regen: transcript -->\nno fence\n", "not followed by a fenced block"),
    ("<!-- regen: transcript -->\n```\n$ echo\n", "closing fence"),
])
def test_bad_markers_are_refused(page, message):
    with pytest.raises(ValueError, match=message):
        regen.marked_blocks(page.splitlines())


def test_the_pages_markers_parse_and_cover_the_bundled_data_examples():
    marked = {}
    for page in regen.PAGES:
        lines = page.read_text().splitlines()
        blocks = regen.marked_blocks(lines)
        for block in blocks:
            if block.kind == "transcript":
                assert regen.transcript_commands(lines[block.start:block.end])
        if blocks:
            marked[page.relative_to(ROOT).as_posix()] = [b.kind for b in blocks]
    assert marked["README.md"] == ["output", "transcript"]
    assert marked["docs/export.md"] == ["transcript"] * 3
    assert marked["docs/evaluate.md"] == ["transcript"] * 2
