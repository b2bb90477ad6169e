"""A killed driver takes its local Ray with it: a watchdog process that outlives the driver.

Why: a ``gnaq train --workers`` driver that starts its own Ray and is then SIGKILLed (the
OOM killer, ``kill -9``, a node agent) runs no cleanup; Ray's GCS and raylet follow it, but
its dashboard and runtime-env agents are re-parented to init and live on. No handler in the
driver can help, so :func:`start_reaper` starts this module as a separate process, in its
own session (a Ctrl-C to the driver's terminal does not reach it), holding the read end of
a pipe whose only writer is the driver. Twice a second it records every descendant of the
driver (pid and kernel start time, so a reused pid is never mistaken); when the pipe reaches
end of file (the driver exited, however it died) it sends SIGTERM to those still alive,
waits two seconds and SIGKILLs the rest, then removes the directories it was given (the
private Ray temp root of :func:`.ray_launch.connect`). Linux only (it reads ``/proc``);
elsewhere nothing is started.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

SNAPSHOT_S = 0.5
GRACE_S = 2.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime is field 22
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every living descendant of ``root``: pid -> start time."""
    children: dict[int, list[int]] = {}
    start: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry))
                start[int(entry)] = info[1]
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != os.getpid():
                found[child] = start[child]
                todo.append(child)
    return found


def _alive(seen: dict[int, int]) -> list[int]:
    out = []
    for pid, started in seen.items():
        info = _stat(pid)
        if info is not None and info[1] == started:
            out.append(pid)
    return out


def _reap(seen: dict[int, int]) -> list[int]:
    """SIGTERM, then after :data:`GRACE_S` SIGKILL, every process of ``seen`` still alive."""
    targets = _alive(seen)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (GRACE_S if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and _alive({p: seen[p] for p in targets}):
            time.sleep(0.05)
        targets = _alive({p: seen[p] for p in targets})
        if not targets:
            break
    return targets


def _watch(driver: int, pipe_fd: int = 0, remove: tuple[str, ...] = ()) -> None:
    """Record the driver's descendants until ``pipe_fd`` reaches end of file, then reap them
    and remove the directories ``remove``."""
    seen: dict[int, int] = {}
    while True:
        readable, _, _ = select.select([pipe_fd], [], [], SNAPSHOT_S)
        if readable and not os.read(pipe_fd, 4096):
            break
        seen.update(descendants(driver))
    _reap(seen)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)


class Reaper:
    """The watchdog process of this driver; :meth:`close` when the local Ray is shut down."""

    def __init__(self, process: subprocess.Popen | None) -> None:
        self.process = process

    def close(self) -> None:
        """End the watch now: what the driver's Ray left behind (if anything) is reaped."""
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=GRACE_S + 3)
            except subprocess.TimeoutExpired:
                pass
            self.process = None


def start_reaper(remove: tuple[str, ...] = ()) -> Reaper:
    """Start the watchdog for this process (a no-op :class:`Reaper` where there is no ``/proc``);
    it removes the directories ``remove`` after the reaping."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return Reaper(None)
    # run as a script, not as a module of the package: the standard library is all it imports
    process = subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), str(os.getpid()), *remove],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    return Reaper(process)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's terminal is not ours
    _watch(int(sys.argv[1]), remove=tuple(sys.argv[2:]))
