"""pipelines/compare_runs.py on two run directories written by RunLog, as `gnaq train` writes them."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script
from gnaq_dist.runlog import RunLog

compare_runs = load_script("pipelines/compare_runs.py")


def _run(path: Path, recalls: list[float]) -> Path:
    log = RunLog(path / "metrics.jsonl")
    log.write("start", method="gnaq")
    for epoch, r in zip((5, 10), recalls):
        log.write("eval", epoch=epoch, phase="fp", **{"recall@20": r, "ndcg@20": r / 2})
    log.write("end", metrics={"recall@20": recalls[-1]})
    return path


def test_compare_prints_the_curves_and_the_gap_to_the_reference_and_plots(tmp_path, capsys):
    ref, other = _run(tmp_path / "a", [0.10, 0.20]), _run(tmp_path / "b", [0.09, 0.19])
    png = tmp_path / "img" / "cmp.png"
    assert compare_runs.main([str(ref), str(other), "--labels", "one", "two", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 10 | 0.2000 | 0.1900 |" in out
    assert "0.1900 (-5.00%)" in out  # (0.19 - 0.20) / 0.20
    assert png.stat().st_size > 1000 and not list(png.parent.glob("*.tmp.*"))


def test_a_directory_without_a_run_log_is_a_clear_error(tmp_path, capsys):
    assert compare_runs.main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    ref = _run(tmp_path / "a", [0.1, 0.2])
    assert compare_runs.main([str(ref), "--labels", "x", "y"]) == 2
    assert "--labels: 2 labels for 1 runs" in capsys.readouterr().err
