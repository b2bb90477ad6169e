"""Edge bundles: export to real Parquet files, serve with numpy only, and agree with the
evaluator (``rank_topk`` on ``final_from_packed``) for GNAQ, a 4-bit method, BiGeaR and fp;
size figures; integrity errors; atomic, non-clobbering writes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import load_config
from gnaq_dist.dataset import load_dataset, load_id_maps
from gnaq_dist.demo import ingest_bundled
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.evaluation import rank_topk
from gnaq_dist.export import export_bundle
from gnaq_dist.graph import build_graph
from gnaq_dist.propagation import final_from_packed, propagate_full
from gnaq_dist.quant import build_method
from gnaq_dist.bundle import BUNDLE_JSON
from gnaq_dist.serving import Bundle
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

LAYERS = 2
K = 20


@pytest.fixture(scope="module")
def synth():
    """Small clustered data with made-up raw ids: strings for users, integers for items."""
    data = clustered_interactions(n_users=150, n_items=90, seed=2)
    users = pa.array([f"u{j:04d}" for j in range(data.n_users)])
    items = pa.array(np.arange(data.n_items, dtype=np.int64) * 7 + 1000)
    return data, build_graph(data), (users, items)


@pytest.fixture(scope="module")
def lastfm(tmp_path_factory):
    """The bundled Last.fm sample, ingested: real string ids and a real train graph."""
    uri = ingest_bundled(tmp_path_factory.mktemp("lastfm") / "dataset", progress=False)
    data = load_dataset(uri)
    return data, build_graph(data), load_id_maps(uri), uri


def trained_gnaq(data):
    """A short single-process GNAQ 2-bit run: the table as training leaves it."""
    config = load_config(TrainConfig, [], [
        "model.method=gnaq", "model.bits=2", "model.dim=16", f"model.num_layers={LAYERS}",
        "schedule.epochs=3", "schedule.warmup_epochs=2", "schedule.batch_size=512", "schedule.eval_every=0",
        "optim.lr=0.02", "progress=false", "seed=5", "eval.ks=[10]",
    ])
    return LocalTrainer(config, data).run().method


def packed(name: str, bits, data, graph, dim: int = 16, level_dtype=torch.float16):
    """A method initialised from a random fp table, and its packed table."""
    torch.manual_seed(11)
    options = {"graph": graph} if name == "bigear" else {}
    method = build_method(name, data.n_nodes, dim, bits, LAYERS, **options)
    method.init_from_full_precision(torch.randn(data.n_nodes, dim) * 0.1)
    return method, method.pack(level_dtype=level_dtype)


def reference_topk(final: torch.Tensor, data, graph, users: np.ndarray):
    items, scores = rank_topk(final[: data.n_users], final[data.n_users :], users, graph.train_csr(), K)
    return items.numpy(), scores.numpy()


def assert_same_ranking(bundle: Bundle, final: torch.Tensor, data, graph) -> None:
    users = np.arange(data.n_users)
    np.testing.assert_allclose(bundle.embeddings, final.numpy(), rtol=1e-5, atol=1e-6)
    ref_items, ref_scores = reference_topk(final, data, graph, users)
    items, scores = bundle.top_k_indices(users, K)
    np.testing.assert_array_equal(items, ref_items)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["gnaq2-trained", "gnaq2-fp32-levels", "lsq4", "gnaq4", "bigear", "fp"])
def test_bundle_ranks_like_the_evaluator(tmp_path, synth, case):
    data, graph, id_maps = synth
    if case == "gnaq2-trained":
        method = trained_gnaq(data)
        table = method.pack(level_dtype=torch.float16)
    elif case == "fp":
        torch.manual_seed(3)
        table = torch.randn(data.n_nodes, 16) * 0.1
    else:
        name, bits, dtype = {"gnaq2-fp32-levels": ("gnaq", 2, torch.float32), "lsq4": ("lsq", 4, torch.float16),
                             "gnaq4": ("gnaq", 4, torch.float16), "bigear": ("bigear", 1, torch.float16)}[case]
        method, table = packed(name, bits, data, graph, level_dtype=dtype)
    kind = "fp" if case == "fp" else "packed"
    export_bundle(str(tmp_path / "b"), kind, table, data, LAYERS, {"step": 7}, id_maps=id_maps)
    bundle = Bundle.load(tmp_path / "b")
    if kind == "fp":
        final = torch.stack(propagate_full(graph, table, LAYERS)).mean(0)
    else:
        final = final_from_packed(graph, table, method.combine, LAYERS)
    assert_same_ranking(bundle, final, data, graph)
    assert bundle.info["meta"] == {"step": 7} and bundle.info["kind"] == kind
    # Raw ids in and out: the same lists as the internal ranking, mapped.
    out = bundle.recommend(["u0003", "u0100"], k=5)
    ref_items, ref_scores = reference_topk(final, data, graph, np.array([3, 100]))
    for (items, scores), ref_i, ref_s in zip(out, ref_items, ref_scores):
        assert items == [int(id_maps[1][i].as_py()) for i in ref_i[:5]]
        np.testing.assert_allclose(scores, ref_s[:5], rtol=1e-5, atol=1e-6)


def test_lastfm_bundle_with_raw_ids(tmp_path, lastfm):
    data, graph, id_maps, _ = lastfm
    method, table = packed("gnaq", 2, data, graph)
    report = export_bundle(str(tmp_path / "b"), "packed", table, data, LAYERS, {}, id_maps=id_maps)
    bundle = Bundle.load(tmp_path / "b")
    final = final_from_packed(graph, table, method.combine, LAYERS)
    assert_same_ranking(bundle, final, data, graph)
    assert bundle.info["dataset"]["fingerprint"] == data.fingerprint and bundle.info["raw_ids"] == "dataset"
    raw_users = id_maps[0].to_pylist()
    items, _ = bundle.recommend([raw_users[5]], k=10)[0]
    ref_items, _ = reference_topk(final, data, graph, np.array([5]))
    assert items == [id_maps[1][i].as_py() for i in ref_items[0, :10]]
    assert report["embedding_bytes_per_node"] == 16 * 2 / 8 + 4 * 2  # 4 codes a byte, 4 fp16 levels


def test_size_report(tmp_path, synth):
    data, graph, id_maps = synth
    n = data.n_nodes
    _, table = packed("gnaq", 2, data, graph, dim=64)
    report = export_bundle(str(tmp_path / "g"), "packed", table, data, LAYERS, {}, id_maps=id_maps)
    # 64 two-bit codes (16 bytes) + 4 fp16 levels (8 bytes) against 256 bytes of fp32.
    assert report["embedding_bytes_per_node"] == 24.0
    assert (report["code_bytes_per_node"], report["level_bytes_per_node"]) == (16.0, 8.0)
    assert report["embedding_bytes"] == 24 * n and report["fp32_bytes"] == 256 * n
    assert report["compression_ratio"] == pytest.approx(256 / 24)
    info = json.loads((tmp_path / "g" / BUNDLE_JSON).read_text())
    sizes = {k: os.path.getsize(tmp_path / "g" / e["path"]) for k, e in info["files"].items()}
    assert sizes == {k: e["bytes"] for k, e in info["files"].items()}
    assert report["embedding_file_bytes"] == sizes["codes"] + sizes["levels"]
    assert report["id_map_file_bytes"] == sizes["users"] + sizes["items"]
    assert report["graph_file_bytes"] == sizes["train"]
    assert info["size_report"] == report and info["level_dtype"] == "float16" and not info["levels_shared"]
    schema = pq.read_schema(tmp_path / "g" / "codes.parquet")
    assert schema.field("codes").type == pa.binary(16)
    assert pq.read_schema(tmp_path / "g" / "levels.parquet").field("levels").type == pa.list_(pa.float16(), 4)
    assert pq.read_schema(tmp_path / "g" / "train.parquet").field("user").type == pa.int32()

    # A shared codebook (LSQ) is stored, and counted, once.
    _, lsq = packed("lsq", 4, data, graph, dim=64)
    report = export_bundle(str(tmp_path / "l"), "packed", lsq, data, LAYERS, {}, id_maps=id_maps)
    assert report["level_bytes_per_node"] == pytest.approx(16 * 2 / n)
    assert report["compression_ratio"] == pytest.approx(256 / (32 + 32 / n))
    assert pq.read_metadata(tmp_path / "l" / "levels.parquet").num_rows == 1

    # fp: the embedding part is the fp32 table itself.
    report = export_bundle(str(tmp_path / "f"), "fp", torch.zeros(n, 64), data, LAYERS, {}, id_maps=id_maps)
    assert report["embedding_bytes_per_node"] == 256.0 and report["compression_ratio"] == 1.0


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, synth):
    data, graph, id_maps = synth
    _, table = packed("gnaq", 2, data, graph)
    path = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(str(path), "packed", table, data, LAYERS, {"step": 1}, id_maps=id_maps)
    return path


def test_serving_imports_no_torch_and_recommend_cli_stays_light(bundle_dir):
    code = (
        "import sys\n"
        "import gnaq_dist.serving\n"
        "heavy = lambda: [m for m in ('torch', 'dgl', 'ray', 'fsspec') if m in sys.modules]\n"
        "print(heavy())\n"
        "from gnaq_dist.cli import main\n"
        f"rc = main(['recommend', {str(bundle_dir)!r}, '--user', 'u0001', '-k', '3'])\n"
        "print(rc, heavy())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[]" and lines[-1] == "0 []"
    assert lines[1] == "user\trank\titem\tscore" and lines[2].startswith("u0001\t1\t")


@pytest.mark.parametrize("module, banned", [
    ("gnaq_dist.bundle", ("torch", "ray", "dgl", "fsspec", "pyarrow")),  # numpy only
    ("gnaq_dist.serving", ("torch", "ray", "dgl", "fsspec")),
    ("gnaq_dist.export", ("torch", "ray", "dgl")),  # tables come in as numpy arrays
])
def test_import_walls(module, banned):
    code = f"import sys\nimport {module}\nprint([m for m in {banned!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {module} imported {out.stdout.strip()}"


def test_export_takes_numpy_arrays(tmp_path, synth):
    """A packed table given as plain numpy fields (no PackedTable, no torch) and an fp numpy
    table make the same bundles as the PackedTable and the tensor."""
    data, graph, id_maps = synth
    _, table = packed("gnaq", 2, data, graph)
    fields = {k: v for k, v in table.to_state().items() if k != "num_rows"}
    export_bundle(str(tmp_path / "p"), "packed", table, data, LAYERS, {}, id_maps=id_maps)
    export_bundle(str(tmp_path / "n"), "packed", types.SimpleNamespace(**fields), data, LAYERS, {}, id_maps=id_maps)
    a, b = Bundle.load(tmp_path / "p"), Bundle.load(tmp_path / "n")
    assert a.info["bundle_sha256"] == b.info["bundle_sha256"]
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    x = np.random.default_rng(0).standard_normal((data.n_nodes, 8)).astype(np.float32)
    export_bundle(str(tmp_path / "f"), "fp", x, data, LAYERS, {}, id_maps=id_maps)
    export_bundle(str(tmp_path / "t"), "fp", torch.from_numpy(x), data, LAYERS, {}, id_maps=id_maps)
    assert Bundle.load(tmp_path / "f").info["bundle_sha256"] == Bundle.load(tmp_path / "t").info["bundle_sha256"]
    with pytest.raises(GnaqInputError, match="needs a PackedTable"):
        export_bundle(str(tmp_path / "x"), "packed", x, data, LAYERS, {})
    bad = types.SimpleNamespace(**{**fields, "codes": fields["codes"][:, :-1]})
    with pytest.raises(GnaqInputError, match="packed codes must be uint8"):
        export_bundle(str(tmp_path / "x"), "packed", bad, data, LAYERS, {})
    assert not (tmp_path / "x").exists()


def test_recommend_cli_batch_files(tmp_path, bundle_dir):
    bundle = Bundle.load(bundle_dir)
    (tmp_path / "users.txt").write_text("u0002\n\nu0042\n")
    pq.write_table(pa.table({"user": ["u0002", "u0042"]}), tmp_path / "users.parquet")
    want = bundle.recommend(["u0002", "u0042"], k=4)
    for users_file, out in (("users.txt", "recs.csv"), ("users.parquet", "recs.parquet")):
        rc = gnaq_main(["recommend", str(bundle_dir), "--users-file", str(tmp_path / users_file), "-k", "4",
                        "--output", str(tmp_path / out)])
        assert rc == 0
        table = (pq.read_table(tmp_path / out) if out.endswith(".parquet")
                 else pacsv.read_csv(tmp_path / out))
        assert table.column_names == ["user", "rank", "item", "score"]
        assert table.column("user").to_pylist() == ["u0002"] * 4 + ["u0042"] * 4
        assert table.column("rank").to_pylist() == [1, 2, 3, 4] * 2
        assert table.column("item").to_pylist() == want[0][0] + want[1][0]
        np.testing.assert_allclose(table.column("score").to_numpy(), np.concatenate([want[0][1], want[1][1]]),
                                   rtol=1e-6)


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,named", [
    ("truncate codes", "codes.parquet"),
    ("flip levels", "levels.parquet"),
    ("delete train", "train.parquet"),
    ("delete bundle.json", "bundle.json"),
    ("edit bundle.json", "bundle.json"),
    ("unknown user", "'nobody'"),
])
def test_bad_bundle_or_user_exits_2_and_writes_nothing(tmp_path, bundle_dir, capsys, damage, named):
    path = tmp_path / "b"
    shutil.copytree(bundle_dir, path)
    user = "u0001"
    if damage == "truncate codes":
        data = (path / "codes.parquet").read_bytes()
        (path / "codes.parquet").write_bytes(data[: len(data) - 100])
    elif damage == "flip levels":
        _flip_byte(path / "levels.parquet", 200)
    elif damage == "delete train":
        (path / "train.parquet").unlink()
    elif damage == "delete bundle.json":
        (path / BUNDLE_JSON).unlink()
    elif damage == "edit bundle.json":
        text = (path / BUNDLE_JSON).read_text()
        (path / BUNDLE_JSON).write_text(text.replace('"num_layers": 2', '"num_layers": 3'))
    else:
        user = "nobody"
    out = tmp_path / "recs.csv"
    rc = gnaq_main(["recommend", str(path), "--user", "u0003", "--user", user, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and named in err, err
    assert not out.exists() and os.listdir(tmp_path) == ["b"]


def test_recommend_subprocess_exit_status(bundle_dir):
    out = subprocess.run([sys.executable, "-m", "gnaq_dist.cli", "recommend", str(bundle_dir), "--user", "zz9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown user id 'zz9'" in out.stderr and out.stdout == ""


def test_overwrite_refused_then_allowed_and_failed_export_leaves_nothing(tmp_path, synth):
    data, graph, id_maps = synth
    _, table = packed("gnaq", 2, data, graph)
    target = tmp_path / "b"
    export_bundle(str(target), "packed", table, data, LAYERS, {"v": 1}, id_maps=id_maps)
    before = (target / BUNDLE_JSON).read_bytes()
    with pytest.raises(GnaqInputError, match="already exists"):
        export_bundle(str(target), "packed", table, data, LAYERS, {"v": 2}, id_maps=id_maps)
    assert (target / BUNDLE_JSON).read_bytes() == before
    export_bundle(str(target), "packed", table, data, LAYERS, {"v": 2}, overwrite=True, id_maps=id_maps)
    assert Bundle.load(target).info["meta"] == {"v": 2}
    # A failure while writing (here: a dataset name bundle.json cannot hold) leaves no trace.
    bad = dataclasses.replace(data, name=b"not json")
    with pytest.raises(TypeError):
        export_bundle(str(tmp_path / "c"), "packed", table, bad, LAYERS, {}, id_maps=id_maps)
    with pytest.raises(TypeError):
        export_bundle(str(target), "packed", table, bad, LAYERS, {"v": 3}, overwrite=True, id_maps=id_maps)
    assert sorted(os.listdir(tmp_path)) == ["b"]
    assert Bundle.load(target).info["meta"] == {"v": 2}


def test_remote_uri_commits_last_and_replaces_old_files(memfs, synth):
    data, graph, id_maps = synth
    _, table = packed("gnaq", 2, data, graph)
    export_bundle("memory://out/b", "packed", table, data, LAYERS, {"v": 1}, id_maps=id_maps)
    export_bundle("memory://out/b", "packed", table, data, LAYERS, {"v": 2}, overwrite=True, id_maps=id_maps)
    fs = fsspec.filesystem("memory")
    info = json.loads(fs.cat("/out/b/bundle.json"))
    listed = sorted(e["path"] for e in info["files"].values())
    assert info["meta"] == {"v": 2}
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/out/b", detail=False)) == sorted(listed + [BUNDLE_JSON])
    bad = dataclasses.replace(data, name=b"not json")
    with pytest.raises(TypeError):
        export_bundle("memory://out/b", "packed", table, bad, LAYERS, {}, overwrite=True, id_maps=id_maps)
    assert json.loads(fs.cat("/out/b/bundle.json")) == info and len(fs.ls("/out/b")) == len(listed) + 1


def test_export_input_errors(tmp_path, synth):
    data, graph, _ = synth
    _, table = packed("gnaq", 2, data, graph)
    with pytest.raises(GnaqInputError, match="kind"):
        export_bundle(str(tmp_path / "x"), "int8", table, data, LAYERS, {})
    with pytest.raises(GnaqInputError, match="id map"):
        export_bundle(str(tmp_path / "x"), "packed", table, data, LAYERS, {}, id_maps=(pa.array(["a"]), None))
    with pytest.raises(GnaqInputError, match="JSON"):
        export_bundle(str(tmp_path / "x"), "packed", table, data, LAYERS, {"step": object()})
    with pytest.raises(GnaqInputError, match=r"fp table must be"):
        export_bundle(str(tmp_path / "x"), "fp", np.zeros((3, 4), np.float32), data, LAYERS, {})
    assert os.listdir(tmp_path) == []
    # Without id maps the raw ids are the internal indices.
    export_bundle(str(tmp_path / "x"), "packed", table, data, LAYERS, {})
    bundle = Bundle.load(tmp_path / "x")
    assert bundle.info["raw_ids"] == "internal" and bundle.user_rows(["3", 4]).tolist() == [3, 4]


def scenario_checkpoint(rank: int, world: int, dataset: str, out: str) -> str:
    """Train GNAQ 2-bit briefly as a one-rank group, writing a sharded checkpoint."""
    from gnaq_dist.distributed.trainer import train_worker

    config = load_config(TrainConfig, [], [
        f"dataset={dataset}", f"out={out}", "model.method=gnaq", "model.bits=2", "model.dim=16",
        f"model.num_layers={LAYERS}", "schedule.epochs=2", "schedule.warmup_epochs=1", "schedule.batch_size=8192",
        "schedule.eval_every=0", "progress=false", "seed=2", "eval.ks=[10]", "checkpoint.every_epochs=2",
    ])
    return train_worker(config, load_dataset(dataset))["checkpoint"]


def test_gnaq_export_from_a_real_checkpoint(tmp_path, lastfm, capsys):
    """``gnaq export`` end to end: checkpoint -> bundle whose top-K is the evaluator's."""
    ckpt = pytest.importorskip("gnaq_dist.checkpoint")
    from distributed_utils import run_ranks

    data, graph, id_maps, dataset = lastfm
    uri = run_ranks(scenario_checkpoint, 1, dataset, str(tmp_path / "run"), timeout=120)[0]
    out = str(tmp_path / "bundle")
    assert gnaq_main(["export", uri, out]) == 0
    printed = capsys.readouterr().out
    assert "12.00 bytes/node" in printed and "5.33x smaller" in printed  # 4 bytes of codes + 8 of levels vs 64
    assert gnaq_main(["export", uri, out]) == 2 and "already exists" in capsys.readouterr().err
    assert gnaq_main(["export", uri, out, "--overwrite"]) == 0
    manifest, kind, table, ck_data = ckpt.load_for_export(uri)
    final = final_from_packed(graph, table, lambda layers: torch.stack(layers).mean(0), LAYERS)
    bundle = Bundle.load(out)
    assert kind == "packed" and bundle.info["meta"]["step"] == manifest["step"]
    assert_same_ranking(bundle, final, data, graph)
    assert bundle.user_ids == id_maps[0].to_pylist() and bundle.item_ids == id_maps[1].to_pylist()
