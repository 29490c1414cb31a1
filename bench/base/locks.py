"""One producer per cache entry: a lock file next to the entry, created atomically (``O_CREAT | O_EXCL``, which
also works on the shared file systems Dask clusters use), holding the holder's host, pid, start time and
heartbeat (rewritten every quarter of the stale age while the lock is held, so that a holder working for hours,
such as a long training, stays visibly alive).

A second process (another run, a Dask worker) that wants the same entry waits, says so once, and then reads
what the first one wrote. A lock is stale, and is taken over, when its holder is on this host and no longer
alive, when its heartbeat is older than ``$BENCH_LOCK_STALE_S`` seconds (default 30 minutes, leaving room for
clock skew between hosts: a holder on another host that died, e.g. a preempted cluster job whose training a rerun
elsewhere resumes), or when it cannot be read.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from bench.base.hashing import atomic_write_text

log = logging.getLogger(__name__)
POLL_S = 0.5


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _max_age() -> float:
    return float(os.environ.get("BENCH_LOCK_STALE_S", 30 * 60))


def _stale(info: dict | None) -> bool:
    if info is None:
        return True
    if time.time() - float(info.get("beat", info.get("since", 0))) > _max_age():
        return True
    return info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _heartbeat(path: Path, holder: dict, stop: threading.Event) -> None:
    """Rewrite the lock's ``beat`` (atomically) every quarter of the stale age until ``stop``; give up, with a
    warning, if the file is no longer this holder's (another process took it over)."""
    while not stop.wait(_max_age() / 4):
        info = _read(path)
        if info is None or any(info.get(k) != holder[k] for k in ("host", "pid", "since")):
            log.warning("lock %s is no longer held by this process (%s)", path, info)
            return
        atomic_write_text(path, json.dumps({**holder, "beat": time.time()}))


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` for the block; ``what`` names the entry in the waiting message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            info = _read(path)
            if info is None:  # being written right now: give it a moment before calling it stale
                time.sleep(POLL_S)
                info = _read(path)
            if _stale(info):
                log.warning("removing stale lock %s (%s)", path, info)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if not said:
                message = (f"waiting for {info.get('host')}:{info.get('pid')}, which is building {what} "
                           f"(lock {path})")
                (say or log.warning)(message)
                said = True
            time.sleep(POLL_S)
            continue
        holder = _holder()
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        break
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, holder, stop), name=f"lock {path.name}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()  # before the unlink: a late beat must not recreate a released lock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
