"""``--address`` is checked within seconds to be Ray (issue 28, item 6).

Real listeners on loopback that are not Ray (a socket that accepts and says nothing, an
HTTP/1 server, a gRPC server without Ray's services) are refused in one line, exit 2,
well before ``ray.init`` would have given up; a real Ray GCS passes.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from gnaq_dist.distributed.address_probe import PROBE_SECONDS, parse_address, probe_ray
from gnaq_dist.errors import GnaqInputError
from test_adversarial_inputs import ingested, refused


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def http_port():
    """A plain HTTP/1 web server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def grpc_port():
    """A gRPC server with no services at all (speaks HTTP/2, is not Ray)."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_address_syntax_is_checked():
    assert parse_address("10.0.0.1:6379") == (False, "10.0.0.1", 6379)
    assert parse_address("ray://head:10001") == (True, "head", 10001)
    for bad in ("nonsense", "host:", "host:port", "http://host:6379", "host:70000"):
        with pytest.raises(GnaqInputError, match="expected HOST:PORT"):
            parse_address(bad)


def test_nobody_listening_is_refused_at_once():
    t0 = time.monotonic()
    with pytest.raises(GnaqInputError, match="no Ray cluster reachable"):
        probe_ray("127.0.0.1:1")
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("scheme", ["", "ray://"])
@pytest.mark.parametrize("listener", ["silent_port", "http_port", "grpc_port"])
def test_a_listener_that_is_not_ray_is_refused_within_seconds(request, listener, scheme):
    port = request.getfixturevalue(listener)
    t0 = time.monotonic()
    with pytest.raises(GnaqInputError, match="something listens there but it is not") as caught:
        probe_ray(f"{scheme}127.0.0.1:{port}")
    assert time.monotonic() - t0 < PROBE_SECONDS + 3
    assert "\n" not in str(caught.value)


def test_gnaq_train_at_a_port_that_is_not_ray_is_one_line_exit_2(tmp_path, capsys, silent_port):
    """The CLI: exit 2 and one line within seconds; no run directory is written."""
    dataset = ingested(capsys, tmp_path)
    t0 = time.monotonic()
    refused(capsys, tmp_path, ["train", "--dataset", str(dataset), "--out", str(tmp_path / "run"),
                               "--address", f"127.0.0.1:{silent_port}", "--no-progress"],
            f"--address 127.0.0.1:{silent_port}", "not a Ray cluster's GCS")
    assert time.monotonic() - t0 < PROBE_SECONDS + 10
    assert not Path(tmp_path / "run").exists()


@pytest.mark.slow
def test_a_real_ray_gcs_and_ray_client_server_pass():
    ray = pytest.importorskip("ray")
    from gnaq_dist.distributed.ray_launch import ray_environment

    ray_environment()
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    try:
        gcs = ray.get_runtime_context().gcs_address
        t0 = time.monotonic()
        probe_ray(gcs)
        assert time.monotonic() - t0 < PROBE_SECONDS
    finally:
        if started:
            ray.shutdown()
