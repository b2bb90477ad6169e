"""SIGTERM and SIGINT as one exception, so every writer's cleanup runs before the process exits.

Why: SIGTERM is what ``timeout``, systemd and Kubernetes send; Python's default for it
ends the process at once, so a staging folder with a half-written file stayed behind.
:func:`install` makes both signals raise :class:`Interrupted` (a ``KeyboardInterrupt``)
in the main thread: ``AtomicOutput`` and ``atomic_path`` remove what they staged on the
way out, a local Ray is shut down, and ``gnaq`` prints one line and exits 130 (SIGINT)
or 143 (SIGTERM), the shell's 128 + signal number. A second signal while that cleanup
runs is ignored, so the cleanup is not cut short (SIGKILL still ends it).

``ray.init`` installs its own SIGTERM handler (:func:`reinstall` puts ours back after it)
and Ray Train's ``fit`` its own SIGINT handler (:func:`call` runs it where it does not).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict[str, Any] = {"installed": False, "received": None}


def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal module's signature
    if _state["received"] is not None:
        return  # the first one's cleanup is running: let it finish
    _state["received"] = signum
    raise Interrupted(signum)


def install() -> bool:
    """Route SIGINT and SIGTERM to :class:`Interrupted` (main thread only; False elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in HANDLED:
        signal.signal(signum, _handler)
    _state["installed"] = True
    _state["received"] = None
    return True


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """:func:`install` for the block, then the handlers that were there before (a ``gnaq``
    command run inside another program, as the tests run it, leaves that program's own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _state["installed"] = False


def reinstall() -> None:
    """Put the handlers back where a library replaced them (``ray.init``), if :func:`install` ran."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            if signal.getsignal(signum) is not _handler:
                signal.signal(signum, _handler)


def call(fn: Any) -> Any:
    """``fn()``, run in a helper thread while the main thread waits, when :func:`install` ran.

    Ray Train's ``fit`` replaces the SIGINT handler when called in the main thread, and then
    ends the process with status 0 or 1 and no word; in a helper thread it leaves signals to
    the main thread, which raises :class:`Interrupted` at once (the caller then shuts Ray
    down). Without our handlers (a library caller), ``fn()`` runs as it is.
    """
    if not _state["installed"] or threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            box["error"] = exc

    thread = threading.Thread(target=target, name="gnaq-interruptible", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for a plain Ctrl-C, 128 + the signal number for :class:`Interrupted`."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def signal_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"


__all__ = ["HANDLED", "Interrupted", "call", "exit_code", "handled", "install", "reinstall", "signal_name"]
