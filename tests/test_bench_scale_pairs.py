"""benchmarks/bench_scale.py --repeat: the alternated pairs' names, discovery and ratios."""

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_scale.py")


def run(edges_per_s, steady, s_per_step):
    return {"edges_per_s": edges_per_s, "steady_edges_per_s": steady, "s_per_step": s_per_step}


def test_stage_names_and_repeats_found_on_disk(bench, tmp_path):
    assert bench.train_stage_name(1, 1) == "train_w1"
    assert bench.train_stage_name(2, 3) == "train_w2_r3"
    assert bench.repeats_done(tmp_path) == 1
    for name in ("train_w1", "train_w2", "train_w1_r2", "train_w2_r2", "train_w1_r4", "train_w1_r3.summary"):
        (tmp_path / f"{name}.json").write_text("{}")
    assert bench.repeats_done(tmp_path) == 4  # r4 (W=1 only) counts; the summary file does not


def test_pair_ratios_take_only_complete_pairs(bench):
    r = {"train_w1": run(100, 110, 2.0), "train_w2": run(190, 220, 1.05),
         "train_w1_r2": run(100, None, 2.0), "train_w2_r2": run(150, 160, 1.3),
         "train_w1_r3": run(100, 100, 2.0)}  # pair 3 unfinished: no W=2 yet
    pairs = bench.pair_ratios(r, 1, 2)["pairs"]
    assert [p["repeat"] for p in pairs] == [1, 2]
    assert pairs[0]["ratio"] == pytest.approx(1.9) and pairs[0]["steady_ratio"] == pytest.approx(2.0)
    assert pairs[1]["ratio"] == pytest.approx(1.5) and pairs[1]["steady_ratio"] is None
    line = bench.pairs_line(pairs, 1, 2)
    assert "2 alternated pairs: 1.90x, 1.50x (median 1.70x, 1.50-1.90x)" in line
    assert "after the first step 2.00x (median 2.00x, 2.00-2.00x)" in line
    # a single run is no series of pairs: the report keeps its one-pair table only
    assert bench.pair_ratios({"train_w1": run(1, 1, 1), "train_w2": run(2, 2, 1)}, 1, 2) == {}
    assert json.dumps(pairs)  # goes into scale.csv as JSON
