"""`gnaq run` (gnaq_dist/demo.py): the fp reference and the Ray workers on one thread budget,
and its plot: training curves with the quantized phase marked, Recall@20 against bytes per node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gnaq_dist.config import load_config
from gnaq_dist.demo import COLUMNS, DEMO_CONFIG, _write_results, demo_configs, demo_figure, plot_demo
from gnaq_dist.train.config import TrainConfig


def _base(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, [DEMO_CONFIG], ["dataset=unused", *overrides])


@pytest.mark.parametrize("workers, threads, budget", [(2, None, 2), (2, 1, 2), (3, 2, 6), (1, 4, 4)])
def test_fp_and_ray_workers_get_one_thread_budget(tmp_path, workers, threads, budget):
    base = _base() if threads is None else _base(f"threads={threads}")
    if threads is None:  # the demo config's own setting
        assert base.threads == 1
    fp, quant, line = demo_configs(base, workers, tmp_path)
    per_worker = base.threads
    assert quant.threads == per_worker and fp.threads == budget == workers * per_worker
    assert fp.model.method == "fp" and fp.model.bits is None and quant.model.method == base.model.method
    assert fp.out == str(tmp_path / "fp") and quant.out == str(tmp_path / "gnaq")
    assert line == (f"threads: {budget} for each run (fp32: 1 process x {budget} torch threads; "
                    f"GNAQ: {workers} Ray workers x {per_worker})")


def test_a_null_thread_setting_means_one_a_worker(tmp_path):
    fp, quant, _ = demo_configs(_base("threads=null"), 2, tmp_path)
    assert (fp.threads, quant.threads) == (2, 1)


def _log(path: Path, records: list[dict]) -> str:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _rows(tmp_path: Path) -> list[dict]:
    fp = [{"event": "epoch", "epoch": e, "phase": "fp"} for e in range(1, 31)]
    fp += [{"event": "eval", "epoch": e, "recall@20": 0.1 + e / 200} for e in range(5, 31, 5)]
    gnaq = [{"event": "epoch", "epoch": e, "phase": "fp" if e <= 20 else "quantized"} for e in range(1, 31)]
    gnaq += [{"event": "eval", "epoch": e, "recall@20": 0.1 + e / 210} for e in range(5, 31, 5)]
    common = {"recall@10": 0.17, "ndcg@10": 0.16, "ndcg@20": 0.2, "fp_epochs": 0}
    return [
        {"method": "LightGCN fp32", "method_key": "fp", "workers": 1, "threads": 2, "recall@20": 0.26,
         "bytes_per_node": 256.0, "compression": 1.0, "seconds": 12.0, "run_dir": _log(tmp_path / "fp", fp), **common},
        {"method": "GNAQ 2-bit (Ray, 2 workers)", "method_key": "gnaq", "workers": 2, "threads": 1, "recall@20": 0.257,
         "bytes_per_node": 24.0, "compression": 10.7, "seconds": 30.0, "run_dir": _log(tmp_path / "gnaq", gnaq),
         **common},
    ]


def test_the_plot_marks_the_quantized_phase_and_plots_recall_against_bytes(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    rows = _rows(tmp_path)
    fig = demo_figure(rows)  # the quantized phase found in GNAQ's log: after epoch 20
    try:
        assert len(fig.axes) == 2
        curves, sizes = fig.axes
        assert len(curves.get_lines()) >= 3  # fp, GNAQ, the line where quantization starts
        assert any(list(line.get_xdata()) == [20, 20] for line in curves.get_lines())
        shaded = [p for p in curves.patches if isinstance(p, (Polygon, Rectangle))]
        assert len(shaded) == 1
        xs = shaded[0].get_xy()[:, 0] if isinstance(shaded[0], Polygon) else [shaded[0].get_x()]
        assert min(xs) == 20 and max(xs) in (30, 20)
        assert "quantized" in " ".join(t.get_text() for t in curves.get_legend().get_texts())
        assert sizes.get_xscale() == "log" and "bytes per node" in sizes.get_xlabel()
        assert sizes.get_ylabel() == "Recall@20"
        offsets = sorted(tuple(c.get_offsets()[0]) for c in sizes.collections)
        assert offsets == [(24.0, pytest.approx(0.257)), (256.0, pytest.approx(0.26))]
    finally:
        plt.close(fig)

    path = tmp_path / "results.png"
    titles = plot_demo(rows, path, quantized_after=20)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    assert len(titles) == 2 and "quantized" in titles[0] and titles[1] == "Quality against size"


def test_results_table_shows_workers_and_threads(tmp_path):
    rows = _rows(tmp_path)
    _write_results(rows, tmp_path)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and "threads" in COLUMNS
    assert lines[2].startswith("| LightGCN fp32 | 1 | 2 | ") and lines[3].startswith("| GNAQ 2-bit (Ray, 2 workers) | 2 | 1 | ")
