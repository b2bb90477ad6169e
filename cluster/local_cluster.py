"""A multi-node Ray cluster on one machine, on the loopback interface only (for tests and trials).

    python cluster/local_cluster.py start [--port 6380] [--node-cpus 2 2] [--dashboard]
    python cluster/local_cluster.py status [--port 6380]
    python cluster/local_cluster.py stop [--port 6380]

(``cluster/local.sh`` calls this; ``tests/test_cluster.py`` starts a real cluster with it.)
Not part of the library: nothing in ``gnaq_dist`` imports it. ``start`` brings up a head node
and one more Ray node per extra ``--node-cpus`` entry with ``ray.cluster_utils.Cluster`` (the
mini-cluster of Ray's own tests), each a separate raylet with its own CPUs, object store and
custom resource (``node_a`` for the head, ``node_b``, ``node_c``...), waits until
``ray.nodes()`` lists them all alive, prints the address (``127.0.0.1:PORT``) and exits; the
nodes keep running (``shutdown_at_exit=False``). ``gnaq train --address 127.0.0.1:PORT
--workers W`` then trains on them. ``stop`` ends this cluster's processes and no others.

Why not ``ray start``: it turns ``--node-ip-address 127.0.0.1`` (and an ``--address`` of
127.0.0.1) into the machine's outward IP, and its servers then listen on every interface. A
node whose IP is exactly 127.0.0.1 binds its GCS, raylet and agents to 127.0.0.1 only, but
``ray start`` refuses to add a second node in that mode; ``Cluster.add_node`` starts nodes
with the same parameters without that check. Every node gets OS-chosen ports (node manager,
object manager, workers, agents), so the nodes and any other Ray on the machine never
compete for a fixed port.

Why not ``ray stop``: it kills every Ray process on the machine, other users' and other
tests' included. All processes of a cluster started here carry its temp dir
(``/tmp/gnaq-ray-PORT`` by default) in their command lines; ``stop`` ends those (raylet
and GCS binaries and Ray's Python daemons) and everything they started (the workers):
raylets first, then the head's daemons, SIGTERM with SIGKILL after a grace period, then
removes the temp dir. It never signals its own process or its parents.

No Ray Client server is started (``ray://`` addresses do not work: connect with
``127.0.0.1:PORT`` from this machine). The dashboard and job server (for
``ray job submit``) start only with ``--dashboard``, on 127.0.0.1, and need
``ray[default]``'s extra packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
DEFAULT_PORT = 6380  # not Ray's 6379, so that a plain `ray start --head` can run beside it
STATE_FILE = "gnaq-cluster.json"


@dataclass
class NodeSpec:
    name: str  # also the node's custom resource (1 unit) and its Ray node name
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)


def node_specs(node_cpus: list[int] | tuple[int, ...]) -> list[NodeSpec]:
    """Head first: node_a, node_b, ... each with its CPUs and one unit of its own resource."""
    if not node_cpus or len(node_cpus) > 26 or any(c < 1 for c in node_cpus):
        raise ValueError(f"node CPUs {list(node_cpus)}: need 1 to 26 nodes with at least 1 CPU each")
    specs = []
    for i, cpus in enumerate(node_cpus):
        name = f"node_{chr(ord('a') + i)}"
        specs.append(NodeSpec(name, int(cpus), {name: 1.0}))
    return specs


def default_temp_dir(port: int) -> Path:
    # Short on purpose: Ray's Unix sockets live below it (a socket path has 107 bytes).
    return Path(f"/tmp/gnaq-ray-{port}")


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps 127.0.0.1 as this host's IP


def _environment(node_ip: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if node_ip == HOST:
        # Ray's Python side turns 127.0.0.1 into the machine's outward IP (where a
        # loopback-only GCS does not answer) unless it runs as a single-host Ray: this
        # switch (named for Windows and macOS, where that is the default) says so. Ray reads
        # it when imported, so it must be set first (``start`` runs in a process of its own);
        # the nodes' processes inherit it, so drivers started inside the cluster (ray job
        # submit) connect; a driver outside needs it too (see loopback_driver()).
        if "ray" in sys.modules and os.environ.get(LOOPBACK_ENV) != "0":
            raise RuntimeError(f"a loopback cluster is started from a process that sets {LOOPBACK_ENV}=0 "
                               f"before importing ray (python cluster/local_cluster.py start)")
        os.environ[LOOPBACK_ENV] = "0"


def _port_open(port: int, host: str = HOST) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now (for tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _node_args(spec: NodeSpec, temp_dir: Path, object_store_mb: int, head: bool, port: int,
               dashboard: bool, dashboard_port: int, node_ip: str = HOST) -> dict[str, Any]:
    """``Cluster.add_node``'s keyword arguments for one node."""
    args: dict[str, Any] = dict(
        node_ip_address=node_ip,
        node_name=spec.name,
        num_cpus=spec.num_cpus,
        num_gpus=0,
        resources=dict(spec.resources),
        object_store_memory=object_store_mb * 1024 * 1024,
        temp_dir=str(temp_dir),
        # OS-chosen ports everywhere: several raylets share this host.
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        object_manager_port=0,
        dashboard_agent_listen_port=0,
        metrics_agent_port=0,
        metrics_export_port=0,
        runtime_env_agent_port=0,
    )
    if head:
        args.update(include_dashboard=dashboard, dashboard_host=HOST, dashboard_port=dashboard_port,
                    gcs_server_port=port)
    return args


def _check_dashboard_dependencies() -> None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"--dashboard needs ray[default]'s packages ({exc}): pip install 'ray[default]'"
        ) from exc


def start(port: int = DEFAULT_PORT, node_cpus: list[int] | tuple[int, ...] = (2, 2),
          temp_dir: str | Path | None = None, object_store_mb: int = 200, dashboard: bool = False,
          dashboard_port: int = 8265, timeout: float = 90.0, node_ip: str = HOST) -> dict[str, Any]:
    """Start the cluster from this process (its nodes outlive it); returns its state.

    Meant for a process of its own (``python cluster/local_cluster.py start``, or
    :func:`launch`): it sets Ray's environment for the nodes. The state (address, temp
    dir, nodes with their Ray node ids, dashboard URL) is also written to
    ``TEMP_DIR/gnaq-cluster.json``. On any failure, what was started is stopped.

    ``node_ip``: 127.0.0.1 (every server listens on the loopback interface only), or
    ``auto`` for what ``ray start`` does (the machine's outward IP, servers listening on
    every interface; drivers then need no environment variable).
    """
    _environment(node_ip)
    if node_ip == "auto":
        from ray.util import get_node_ip_address

        node_ip = get_node_ip_address()
    specs = node_specs(node_cpus)
    temp_dir = Path(temp_dir) if temp_dir else default_temp_dir(port)
    if _port_open(port, node_ip) or _port_open(port):
        raise RuntimeError(f"port {port} is in use (a cluster there? "
                           f"python cluster/local_cluster.py stop --port {port})")
    if cluster_processes(temp_dir):
        raise RuntimeError(f"Ray processes of {temp_dir} are still running: stop them first")
    if dashboard:
        _check_dashboard_dependencies()
    temp_dir.mkdir(parents=True, exist_ok=True)

    from ray.cluster_utils import Cluster

    address = f"{node_ip}:{port}"
    # The nodes' processes inherit it: Ray code that looks for "the" local cluster (Ray
    # Train's placement-group cleaner asks the state API) finds this one, not whichever
    # other Ray runs on the machine ("Found multiple active Ray instances").
    os.environ["RAY_ADDRESS"] = address
    # Job entrypoints (`ray job submit -- gnaq train ...`) run in a shell the nodes start:
    # this interpreter's scripts (gnaq, ray) come first on its PATH, as they would on a
    # cluster whose image installed gnaq-dist, even when the virtualenv is not activated.
    scripts = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([scripts, *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                     if p and p != scripts)])
    try:
        # As `ray start` without --block: no reaper, the processes outlive this one.
        cluster = Cluster(shutdown_at_exit=False)
        for i, spec in enumerate(specs):
            cluster.add_node(wait=False, **_node_args(spec, temp_dir, object_store_mb, head=i == 0, port=port,
                                                      dashboard=dashboard, dashboard_port=dashboard_port,
                                                      node_ip=node_ip))
        nodes = wait_for_nodes(address, specs, timeout)
    except BaseException:
        stop(temp_dir=temp_dir, remove=False)
        raise
    state = {
        "address": address,
        "temp_dir": str(temp_dir),
        "nodes": nodes,
        "dashboard": f"http://{HOST}:{dashboard_port}" if dashboard else None,
        "loopback": node_ip == HOST,
    }
    (temp_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    return state


def launch(port: int = DEFAULT_PORT, node_cpus: list[int] | tuple[int, ...] = (2, 2),
           temp_dir: str | Path | None = None, object_store_mb: int = 200, timeout: float = 90.0,
           extra_args: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``start`` in a child process (as the script does); returns the cluster's state."""
    import subprocess
    import tempfile

    temp_dir = Path(temp_dir) if temp_dir else default_temp_dir(port)
    command = [sys.executable, str(Path(__file__).resolve()), "start", "--port", str(port),
               "--temp-dir", str(temp_dir), "--object-store-mb", str(object_store_mb),
               "--timeout", str(timeout), "--node-cpus", *map(str, node_cpus), *extra_args]
    # Output to a file, not a pipe: a daemon that inherited the pipe would keep it open.
    with tempfile.TemporaryFile("w+") as log:
        code = subprocess.call(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout + 60)
        log.seek(0)
        output = log.read()
    if code != 0:
        stop(temp_dir=temp_dir, remove=False)
        raise RuntimeError(f"starting the local cluster failed (exit {code}):\n{output[-4000:]}")
    return json.loads((temp_dir / STATE_FILE).read_text())


def wait_for_nodes(address: str, specs: list[NodeSpec], timeout: float = 90.0) -> list[dict]:
    """Connect as a driver until ``ray.nodes()`` lists every node alive; one dict per node."""
    import ray

    deadline = time.time() + timeout
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", configure_logging=False)
    try:
        while True:
            alive = {}
            for info in ray.nodes():
                if not info.get("Alive"):
                    continue
                for spec in specs:
                    if info.get("Resources", {}).get(spec.name):
                        alive[spec.name] = {
                            "name": spec.name, "node_id": info["NodeID"],
                            "ip": info.get("NodeManagerAddress"),
                            "cpus": info["Resources"].get("CPU", 0.0),
                            "head": spec is specs[0],
                        }
            if len(alive) == len(specs):
                return [alive[spec.name] for spec in specs]
            if time.time() > deadline:
                missing = [s.name for s in specs if s.name not in alive]
                raise TimeoutError(f"Ray nodes {missing} not alive after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        ray.shutdown()


def _is_ray_process(cmdline: list[str]) -> bool:
    """Ray's own executables: the gcs_server/raylet binaries or a Python script of the ray package."""
    head = cmdline[:3]
    return any(f"{os.sep}ray{os.sep}" in arg and (arg.endswith((".py", "gcs_server", "raylet")))
               for arg in head)


def cluster_processes(temp_dir: str | Path) -> list:
    """This cluster's processes: Ray daemons whose command line names ``temp_dir``, and
    all their descendants (workers, agents). Never this process or its ancestors."""
    import psutil

    marker = str(Path(temp_dir)) + os.sep
    spared = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.pid in spared or not _is_ray_process(cmdline):
            continue
        if any(marker in arg for arg in cmdline):
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                if child.pid not in spared:
                    found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    live = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.Error:
            pass
    return live


def _signal(procs: list, kill: bool = False) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill() if kill else proc.terminate()
        except psutil.Error:
            pass


def stop(port: int | None = DEFAULT_PORT, temp_dir: str | Path | None = None, grace: float = 10.0,
         remove: bool = True) -> int:
    """End the cluster's processes; returns how many there were.

    Raylets first (SIGTERM: their workers and agents go with them), then the
    head's GCS, dashboard and log monitor (SIGTERM); whatever is left after ``grace``
    seconds of each, and the autoscaler monitor (which does not act on SIGTERM), gets
    SIGKILL. ``temp_dir`` defaults to the one ``start`` derives from ``port``. With
    ``remove``, the temp dir (logs, sockets, spilled objects) is deleted afterwards.
    """
    import psutil

    temp_dir = Path(temp_dir) if temp_dir else default_temp_dir(port)
    procs = cluster_processes(temp_dir)

    def name(proc) -> str:
        try:
            return proc.name() + " " + " ".join(proc.cmdline()[:3])
        except psutil.Error:
            return ""

    raylets = [p for p in procs if name(p).startswith("raylet")]
    _signal(raylets)
    psutil.wait_procs(raylets, timeout=grace)
    rest = cluster_processes(temp_dir)
    monitors = [p for p in rest if "autoscaler" in name(p) and "monitor.py" in name(p)]
    others = [p for p in rest if p not in monitors]
    _signal(others)
    _signal(monitors, kill=True)
    _gone, alive = psutil.wait_procs(others, timeout=grace)
    _signal(alive, kill=True)
    psutil.wait_procs(alive + monitors, timeout=5)
    # Anything started meanwhile (a raylet starting a worker as it went down): once more.
    late = cluster_processes(temp_dir)
    _signal(late, kill=True)
    psutil.wait_procs(late, timeout=5)
    seen = {p.pid for p in procs} | {p.pid for p in rest} | {p.pid for p in late}
    if remove and temp_dir.is_dir() and not cluster_processes(temp_dir):
        shutil.rmtree(temp_dir, ignore_errors=True)
    return len(seen)


def status(port: int = DEFAULT_PORT, temp_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The state ``start`` wrote, with the number of live processes; None if nothing runs."""
    temp_dir = Path(temp_dir) if temp_dir else default_temp_dir(port)
    procs = cluster_processes(temp_dir)
    state_file = temp_dir / STATE_FILE
    if not procs and not state_file.exists():
        return None
    state = json.loads(state_file.read_text()) if state_file.exists() else {"temp_dir": str(temp_dir)}
    state["processes"] = len(procs)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/local_cluster.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"GCS port of the head (default {DEFAULT_PORT})")
        p.add_argument("--temp-dir", default=None, help="Ray's temp dir of the cluster (default /tmp/gnaq-ray-PORT)")
        if name == "start":
            p.add_argument("--node-cpus", type=int, nargs="+", default=[2, 2],
                           help="logical CPUs per node, head first (default: 2 2, a head and one more node)")
            p.add_argument("--object-store-mb", type=int, default=200, help="object store per node (MiB)")
            p.add_argument("--dashboard", action="store_true",
                           help="start the dashboard and job server on 127.0.0.1 (needs ray[default])")
            p.add_argument("--dashboard-port", type=int, default=8265)
            p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the nodes")
            p.add_argument("--node-ip", default=HOST,
                           help="127.0.0.1 (default: loopback only) or auto (the machine's IP, as `ray start`)")
        if name == "stop":
            p.add_argument("--keep-temp-dir", action="store_true", help="keep the logs")
    args = parser.parse_args(argv)
    if args.command == "start":
        try:
            state = start(args.port, args.node_cpus, args.temp_dir, args.object_store_mb,
                          args.dashboard, args.dashboard_port, args.timeout, args.node_ip)
        except (RuntimeError, TimeoutError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for node in state["nodes"]:
            print(f"node {node['name']}: {node['cpus']:g} CPUs, id {node['node_id']}"
                  f"{' (head)' if node['head'] else ''}")
        if state["dashboard"]:
            print(f"dashboard: {state['dashboard']}")
        print(f"logs: {state['temp_dir']}/session_latest/logs")
        if state["loopback"]:
            print(f"drivers outside the cluster need: export {LOOPBACK_ENV}=0")
        print(f"stop: python cluster/local_cluster.py stop --port {args.port}"
              + (f" --temp-dir {state['temp_dir']}" if args.temp_dir else ""))
        print(f"address: {state['address']}")
        return 0
    if args.command == "stop":
        n = stop(args.port, args.temp_dir, remove=not args.keep_temp_dir)
        print(f"stopped {n} processes")
        return 0
    state = status(args.port, args.temp_dir)
    if state is None:
        print("not running")
        return 1
    print(json.dumps(state, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
