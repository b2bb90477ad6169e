"""``--address``: is Ray listening there? Answered within seconds, before ``ray.init``.

Why: ``ray.init(address=...)`` at a port where something other than Ray listens (a web
server, a database, a stale port) waits for minutes before it gives up. A TCP connect
alone does not tell (anything listening accepts it), so the probe asks the question only
Ray answers: one gRPC call with a deadline, ``NodeInfoGcsService/GetClusterId`` for a
``HOST:PORT`` (the cluster's GCS) or ``RayletDriver/ClusterInfo(PING)`` for a
``ray://HOST:PORT`` (the Ray Client server). A reply, or a refusal for missing
credentials (that is Ray asking for its token), counts as Ray; an unknown method, a
broken HTTP/2 exchange or silence until the deadline does not.

``auto`` and ``local`` are Ray's own lookups (of a cluster started on this machine) and
are left to ``ray.init``.
"""

from __future__ import annotations

import socket

from gnaq_dist.errors import GnaqInputError

PROBE_SECONDS = 5.0


def parse_address(address: str) -> tuple[bool, str, int]:
    """``(is_ray_client, host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``."""
    client = address.startswith("ray://")
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if ("://" in address and not client) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GnaqInputError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    return client, host.strip("[]"), int(port)


def probe_ray(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Refuse (``GnaqInputError``, one line) an ``address`` where no Ray answers within ``timeout`` s."""
    if address in ("auto", "local"):
        return
    client, host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise GnaqInputError(f"--address {address}: no Ray cluster reachable there "
                             f"({exc.strerror or exc.__class__.__name__})") from None
    import grpc

    target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            if client:
                from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

                request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
                ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=timeout)
            else:
                from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

                gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return  # Ray, asking for its auth token: ray.init reports that itself
            what = "a Ray Client server (ray://)" if client else "a Ray cluster's GCS"
            reason = code.name if code is not None else exc.__class__.__name__
            raise GnaqInputError(f"--address {address}: something listens there but it is not {what} "
                                 f"(no Ray reply within {timeout:g} s: {reason})") from None


__all__ = ["PROBE_SECONDS", "parse_address", "probe_ray"]
