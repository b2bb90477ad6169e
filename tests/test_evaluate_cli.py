"""``gnaq evaluate`` on real files: a tiny generated log, ingested; a one-rank training run
with checkpoints; its export; popularity and the generator's oracle; input errors."""

from __future__ import annotations

import json
from importlib.metadata import version as dist_version

import numpy as np
import pyarrow as pa
import pytest

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import from_dict, load_config
from gnaq_dist.dataset import load_dataset
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.evaluation import users_to_evaluate
from gnaq_dist.graph import interactions_csr
from gnaq_dist.oracle import Oracle, parse_raw_ids, read_spec
from gnaq_dist.synthetic_logs import LatentModel, LogSpec, generate_log, iter_rows
from gnaq_dist.train.config import TrainConfig

SPEC = LogSpec(users=400, items=200, rows=8000, seed=5)
KS = (10, 20)
MAX_USERS, SEED = 300, 7  # the run's eval settings: a sample, and not the defaults


def _ingest(log, out) -> str:
    from gnaq_dist.ingest import IngestConfig, ingest

    ingest(str(log), str(out), from_dict(IngestConfig, {"progress": False}))
    return str(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The log, its dataset, and a log of another seed (same sizes) with its own dataset."""
    root = tmp_path_factory.mktemp("evaluate")
    generate_log(root / "log", SPEC, progress=False)
    generate_log(root / "other_log", LogSpec(users=400, items=200, rows=8000, seed=6), progress=False)
    return {"root": root, "log": str(root / "log"), "dataset": _ingest(root / "log", root / "ds"),
            "other_log": str(root / "other_log"), "other_dataset": _ingest(root / "other_log", root / "ds_other")}


def scenario_train(rank: int, world: int, dataset: str, out: str) -> list[dict]:
    """GNAQ 2-bit on one gloo rank, a checkpoint and an evaluation every epoch; the history."""
    from gnaq_dist.distributed.trainer import train_worker

    config = load_config(TrainConfig, [], [
        f"dataset={dataset}", f"out={out}", "model.method=gnaq", "model.bits=2", "model.dim=16",
        "model.num_layers=2", "schedule.epochs=3", "schedule.warmup_epochs=1", "schedule.batch_size=1024",
        "schedule.eval_every=1", "optim.lr=0.02", "progress=false", f"seed={SEED}", "eval.ks=[10,20]",
        f"eval.max_users={MAX_USERS}", "eval.batch_size=64", "checkpoint.every_epochs=1",
    ])
    return train_worker(config, load_dataset(dataset))["history"]


@pytest.fixture(scope="module")
def run(tiny):
    from distributed_utils import run_ranks

    out = str(tiny["root"] / "run")
    history = run_ranks(scenario_train, 1, tiny["dataset"], out, timeout=240)[0]
    return out, history


def evaluate_json(capsys, *args) -> dict:
    assert gnaq_main(["evaluate", *args, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_one_line_error(capsys, args, *fragments) -> str:
    assert gnaq_main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gnaq evaluate: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


METRICS = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]


# -- a model -----------------------------------------------------------------------------------
def test_every_checkpoint_scores_what_its_run_logged(run, tiny, capsys):
    """fp warm-up and quantized checkpoints alike; settings default to the run's eval config."""
    out, history = run
    checkpoints = [r for r in history if r["event"] == "checkpoint"]
    evals = {r["step"]: r for r in history if r["event"] == "eval"}
    assert len(checkpoints) == 3
    for ck in checkpoints:
        result = evaluate_json(capsys, ck["uri"], "--dataset", tiny["dataset"])
        logged = evals[ck["step"]]
        assert {k: result[k] for k in METRICS} == {k: logged[k] for k in METRICS}, (ck, result, logged)
        assert result["source"] == "checkpoint" and result["ks"] == list(KS)
        assert (result["max_users"], result["seed"]) == (MAX_USERS, SEED) and result["users"] <= MAX_USERS
        assert ck["uri"] in result["model"] and f"step {ck['step']}" in result["model"]
    assert "fp, step" in evaluate_json(capsys, checkpoints[0]["uri"], "--dataset", tiny["dataset"])["model"]
    last = history[[r["event"] for r in history].index("end")]
    assert {k: last["metrics"][k] for k in METRICS} == {k: evals[checkpoints[-1]["step"]][k] for k in METRICS}


@pytest.mark.slow
def test_two_worker_checkpoints_score_what_their_run_logged(tiny, capsys):
    """Two ranks split the evaluation by owner and add their sums: the same ranking, the
    metrics equal up to the order of float summation."""
    from distributed_utils import run_ranks

    history = run_ranks(scenario_train, 2, tiny["dataset"], str(tiny["root"] / "run2"), timeout=240)[0]
    evals = {r["step"]: r for r in history if r["event"] == "eval"}
    for ck in [r for r in history if r["event"] == "checkpoint"]:
        result = evaluate_json(capsys, ck["uri"], "--dataset", tiny["dataset"])
        logged = evals[ck["step"]]
        assert {k: result[k] for k in METRICS} == pytest.approx({k: logged[k] for k in METRICS}, rel=1e-12)


def test_bundle_scores_like_its_checkpoint(run, tiny, capsys):
    out, history = run
    uri = [r for r in history if r["event"] == "checkpoint"][-1]["uri"]
    bundle = str(tiny["root"] / "bundle")
    assert gnaq_main(["export", uri, bundle]) == 0
    capsys.readouterr()
    settings = ["--ks", "10,20", "--max-users", str(MAX_USERS), "--seed", str(SEED), "--dataset", tiny["dataset"]]
    from_bundle = evaluate_json(capsys, bundle, *settings)
    from_checkpoint = evaluate_json(capsys, uri, *settings)
    assert from_bundle["source"] == "bundle" and "gnaq 2-bit" in from_bundle["model"]
    assert from_bundle["users"] == from_checkpoint["users"]
    # the same ranking; the sums may differ in the last bit with the order torch's threads add them
    assert {k: from_bundle[k] for k in METRICS} == pytest.approx({k: from_checkpoint[k] for k in METRICS}, rel=1e-12)
    # without the run's settings: every user with a test item, ks 10,20,50, test split
    full = evaluate_json(capsys, bundle, "--dataset", tiny["dataset"])
    test = load_dataset(tiny["dataset"]).test_user
    assert full["users"] == np.unique(test).size and full["ks"] == [10, 20, 50] and full["max_users"] is None
    # ... a bundle of another dataset is refused
    assert_one_line_error(capsys, [bundle, "--dataset", tiny["other_dataset"]], bundle, "another dataset")


def test_checkpoint_of_another_dataset_is_refused(run, tiny, capsys):
    _, history = run
    uri = [r for r in history if r["event"] == "checkpoint"][-1]["uri"]
    assert_one_line_error(capsys, [uri, "--dataset", tiny["other_dataset"]], uri, "another dataset",
                          tiny["other_dataset"])


def test_human_table(run, tiny, capsys):
    _, history = run
    uri = [r for r in history if r["event"] == "checkpoint"][-1]["uri"]
    assert gnaq_main(["evaluate", uri, "--dataset", tiny["dataset"], "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model: checkpoint ") and f"sample of at most {MAX_USERS}, seed {SEED}" in lines[1]
    assert lines[2].split() == ["K", "recall", "ndcg"] and [line.split()[0] for line in lines[3:]] == ["10", "20"]


# -- popularity --------------------------------------------------------------------------------
def brute_force_popularity(data, users, ks):
    """Per user: unseen items by (train users desc, index asc), recall and NDCG by hand."""
    train = interactions_csr(data.train_user, data.train_item, data.n_users, data.n_items)
    test = interactions_csr(data.test_user, data.test_item, data.n_users, data.n_items)
    count = np.bincount(train[1], minlength=data.n_items)
    order = np.lexsort((np.arange(data.n_items), -count))
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for u in users:
        seen = set(train[1][train[0][u]:train[0][u + 1]].tolist())
        held = set(test[1][test[0][u]:test[0][u + 1]].tolist())
        ranked = [i for i in order if i not in seen]
        for k in ks:
            hits = [ranked[r] in held for r in range(k)]
            out[f"recall@{k}"] += sum(hits) / len(held)
            idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(held))))
            out[f"ndcg@{k}"] += sum(h / np.log2(r + 2) for r, h in enumerate(hits)) / idcg
    return {k: v / len(users) for k, v in out.items()}


def test_popularity_matches_a_brute_force_ranking(tiny, capsys):
    data = load_dataset(tiny["dataset"])
    result = evaluate_json(capsys, "--popularity", "--dataset", tiny["dataset"], "--ks", "10,20",
                           "--max-users", "150", "--seed", "3")
    users = users_to_evaluate(interactions_csr(data.test_user, data.test_item, data.n_users, data.n_items)[0], 150, 3)
    assert result["users"] == 150 and result["source"] == "popularity"
    expected = brute_force_popularity(data, users, KS)
    assert {k: result[k] for k in METRICS} == pytest.approx(expected, rel=1e-12)
    assert set(result) == {"model", "source", "dataset", "split", "users", "max_users", "seed", "ks", *METRICS}


# -- the oracle --------------------------------------------------------------------------------
def test_oracle_scores_are_the_generators_probabilities():
    """p(item | user) sums to 1 over the catalogue and matches the log's empirical frequencies."""
    spec = LogSpec(users=400, items=200, rows=2_000_000, seed=5)
    users = pa.array([f"u{k}" for k in range(spec.users)])
    items = pa.array([f"i{k}" for k in range(spec.items)])
    oracle = Oracle.build(spec, users, items, "test")
    p = oracle.scores(np.arange(spec.users)).numpy()
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    C = LatentModel(spec).n_clusters
    counts = np.zeros((C, spec.items))
    for rows in iter_rows(spec, chunk=1 << 18):
        np.add.at(counts, (oracle.user_cluster[rows["user"]], rows["item"]), 1.0)
    first_user = np.array([np.flatnonzero(oracle.user_cluster == c)[0] for c in range(C)])
    predicted = p[first_user]  # every user of a cluster has the same row
    n = counts.sum(1, keepdims=True)
    tolerance = 5 * np.sqrt(predicted / n) + 1e-5  # 5 sigma of a binomial frequency
    assert np.all(np.abs(counts / n - predicted) < tolerance)


def test_oracle_beats_popularity_and_is_deterministic(tiny, capsys):
    args = ["--dataset", tiny["dataset"], "--ks", "10,20"]
    oracle = evaluate_json(capsys, "--oracle", tiny["log"], *args)
    assert evaluate_json(capsys, "--oracle", tiny["log"], *args) == oracle and oracle["source"] == "oracle"
    batched = evaluate_json(capsys, "--oracle", tiny["log"], *args, "--batch-size", "7")  # sums in another order
    assert {k: batched[k] for k in METRICS} == pytest.approx({k: oracle[k] for k in METRICS}, rel=1e-12)
    popularity = evaluate_json(capsys, "--popularity", *args)
    assert oracle["recall@20"] > 2 * popularity["recall@20"], (oracle, popularity)  # measured 0.83 vs 0.28
    assert oracle["ndcg@10"] > 2 * popularity["ndcg@10"]


def test_posterior_oracle_infers_the_cluster_from_the_train_items(tiny, capsys):
    """Many own-cluster items pin the cluster (the oracle's row); none leave the prior (the
    catalogue's marginal p(item)); on the dataset it lies between popularity and the oracle."""
    spec = SPEC
    users = pa.array([f"u{k}" for k in range(spec.users)])
    items = pa.array([f"i{k}" for k in range(spec.items)])
    oracle = Oracle.build(spec, users, items, "test")
    own = np.flatnonzero(oracle.item_cluster == oracle.user_cluster[0])[:6]
    indptr, indices = np.array([0, own.size, own.size]), own  # user 0: six own-cluster items; user 1: none
    post = oracle.posterior_scores(np.array([0, 1]), (indptr, indices)).numpy()
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(post[0], oracle.scores(np.array([0])).numpy()[0], rtol=0.05)
    marginal = oracle.table.mean(0)[oracle.item_cluster] * oracle.item_weight  # clusters dealt uniformly
    np.testing.assert_allclose(post[1], marginal, rtol=1e-12)
    args = ["--dataset", tiny["dataset"], "--ks", "20"]
    full = evaluate_json(capsys, "--oracle", tiny["log"], *args)
    inferred = evaluate_json(capsys, "--oracle", tiny["log"], "--posterior", *args)
    popularity = evaluate_json(capsys, "--popularity", *args)
    assert popularity["recall@20"] < inferred["recall@20"] <= full["recall@20"] + 0.02, (popularity, inferred, full)
    assert "train items" in inferred["model"]
    assert_one_line_error(capsys, ["--popularity", "--posterior", *args], "--posterior goes with --oracle")


def test_oracle_refuses_a_log_that_is_not_the_source(tiny, capsys):
    # same sizes, another seed: the ids parse and lie in range, the hidden clusters do not fit
    assert_one_line_error(capsys, ["--oracle", tiny["other_log"], "--dataset", tiny["dataset"]],
                          tiny["other_log"], "not the source")
    # a smaller spec: more users in the dataset than the log can have
    small = tiny["root"] / "small_log"
    generate_log(small, LogSpec(users=100, items=200, rows=2000, seed=5), progress=False)
    assert_one_line_error(capsys, ["--oracle", str(small), "--dataset", tiny["dataset"]], "not its source")
    # a single-file log has no _generate.json; a missing one is named
    single = tiny["root"] / "single.parquet"
    generate_log(single, LogSpec(users=10, items=5, rows=50), progress=False)
    assert_one_line_error(capsys, ["--oracle", str(single), "--dataset", tiny["dataset"]], str(single),
                          "_generate.json")
    missing = str(tiny["root"] / "nowhere")
    assert_one_line_error(capsys, ["--oracle", missing, "--dataset", tiny["dataset"]], missing)


def test_oracle_accepts_a_small_saturated_source(tmp_path, capsys):
    """50 users with ~100 rows each on 20 items: most pairs are seen, own-cluster agreement
    is near chance (32% vs 25%), yet the likelihood check still tells the source (z = 7.4)."""
    spec = LogSpec(users=50, items=20, rows=5000)
    generate_log(tmp_path / "log", spec, progress=False)
    generate_log(tmp_path / "other", LogSpec(users=50, items=20, rows=5000, seed=9), progress=False)
    dataset = _ingest(tmp_path / "log", tmp_path / "ds")
    assert evaluate_json(capsys, "--oracle", str(tmp_path / "log"), "--dataset", dataset)["users"] > 0
    assert_one_line_error(capsys, ["--oracle", str(tmp_path / "other"), "--dataset", dataset], "not the source")


def test_raw_ids_must_parse_into_the_specs_range():
    assert parse_raw_ids(pa.array(["u0", "u399", "u7"]), "u", 400, "user", "ds").tolist() == [0, 399, 7]
    with pytest.raises(GnaqInputError, match="user id u400 is outside the log's 400 users"):
        parse_raw_ids(pa.array(["u0", "u400"]), "u", 400, "user", "ds")
    for bad in ("user1", "u01", "u", "u-3", "i3"):
        with pytest.raises(GnaqInputError, match="is not 'u<k>'"):
            parse_raw_ids(pa.array(["u1", bad]), "u", 400, "user", "ds")
    with pytest.raises(GnaqInputError, match="ids are int64"):
        parse_raw_ids(pa.array([1, 2]), "u", 400, "user", "ds")


def test_read_spec_round_trips_the_generators_metadata(tiny):
    assert read_spec(tiny["log"]) == SPEC


# -- input errors and --version ----------------------------------------------------------------
def test_input_errors_are_one_line(tiny, capsys):
    ds = tiny["dataset"]
    assert_one_line_error(capsys, ["--dataset", ds], "exactly one of")
    assert_one_line_error(capsys, ["--popularity", "--oracle", tiny["log"], "--dataset", ds],
                          "--popularity and --oracle")
    assert_one_line_error(capsys, [ds, "--popularity", "--dataset", ds], "exactly one of")
    assert_one_line_error(capsys, ["--popularity"], "--dataset")
    missing = str(tiny["root"] / "no_such_checkpoint")
    assert_one_line_error(capsys, [missing, "--dataset", ds], missing, "no such checkpoint or bundle")
    assert_one_line_error(capsys, [ds, "--dataset", ds], "is a dataset")
    assert_one_line_error(capsys, [tiny["log"], "--dataset", ds], "neither a checkpoint")
    assert_one_line_error(capsys, ["--popularity", "--dataset", str(tiny["root"] / "nodata")], "nodata")
    assert_one_line_error(capsys, ["--popularity", "--dataset", ds, "--ks", "10,x"], "--ks", "10,x")
    assert_one_line_error(capsys, ["--popularity", "--dataset", ds, "--ks", "0"], "--ks")
    assert_one_line_error(capsys, ["--popularity", "--dataset", ds, "--max-users", "0"], "--max-users")
    assert_one_line_error(capsys, ["--popularity", "--dataset", ds, "--split", "valid"], "no valid split")


def test_version(capsys):
    assert gnaq_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gnaq {dist_version('gnaq-dist')}"
    with pytest.raises(SystemExit) as exc:  # argparse's own flag, shown in --help
        gnaq_main(["--version", "evaluate"])
    assert exc.value.code == 0
