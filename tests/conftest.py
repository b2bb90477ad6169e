"""Shared fixtures: a clean memory:// filesystem and helpers to write real Parquet logs."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT / ".." / "shared" / "data"


def load_script(relative: str):
    """A script outside the package (``benchmarks/``, ``cluster/``, ``pipelines/``, ``scripts/``),
    loaded as a module by its path under the project root."""
    import importlib.util
    import sys

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _clear_memory() -> None:
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


@pytest.fixture
def memfs():
    """The process-wide memory:// filesystem, empty before and after the test."""
    _clear_memory()
    yield fsspec.filesystem("memory")
    _clear_memory()


def write_log(uri: str, data: dict | pa.Table, **kwargs) -> str:
    """Write ``data`` as a Parquet file at ``uri`` (any fsspec URI); returns ``uri``."""
    table = data if isinstance(data, pa.Table) else pa.table(data)
    fs, path = fsspec.core.url_to_fs(str(uri))
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle, **kwargs)
    return str(uri)


@pytest.fixture
def shared_data() -> Path:
    path = SHARED_DATA.resolve()
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use one intra-op thread: the models are tiny, and on a 2-core machine two
    OpenMP threads fighting another process make a step 10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real moto S3 server on 127.0.0.1 for the session; its endpoint URL (skips without moto/s3fs)."""
    import socket

    try:
        from moto.server import ThreadedMotoServer
        import s3fs  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"moto[server] / s3fs not installed: {exc}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any start failure means: cannot test here
        pytest.skip(f"moto server could not start on 127.0.0.1:{port}: {exc}")
    yield f"http://127.0.0.1:{port}"
    server.stop()
