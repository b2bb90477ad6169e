#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, on 127.0.0.1 only (docs/cluster.md).
#
#   cluster/local.sh start [--port 6380] [--node-cpus 2 2] [--dashboard]   head + one node per extra CPU count
#   cluster/local.sh status [--port 6380]
#   cluster/local.sh stop [--port 6380]                                    ends this cluster's processes only
#
# Then, from this machine:
#   export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0    # let the driver keep 127.0.0.1 (see docs/cluster.md)
#   gnaq train --address 127.0.0.1:6380 --workers 2 --dataset DATASET ...
#
# The work is done by cluster/local_cluster.py (shared with tests/test_cluster.py). It
# runs with the Python of $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}" RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
if [[ $# -eq 0 ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
exec "$PYTHON" "$ROOT/cluster/local_cluster.py" "$@"
