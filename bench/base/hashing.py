"""Stable hashes and atomic file writes shared by the caches and the result writer."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the one text form that hashes and ``params`` use."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _create_temp(directory: Path, name: str) -> str:
    """Create a new empty file ``directory/.NAME.<random>.tmp`` and return its path. Unlike ``tempfile.mkstemp``
    (always mode 0600) the file is created with mode 0666 and the kernel applies the process umask (or the
    directory's default ACL), so results and caches are as readable as any file the user creates: 0644 under
    the usual umask 022, shareable under 002, private under 077. No umask is read (reading it means setting it,
    which races with other threads)."""
    for _ in range(100):
        tmp = str(directory / f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no unused temporary name for {name} in {directory}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file, and an
    interrupted write leaves the previous file (if any) intact. The file's mode honours the umask (0644 under
    umask 022), like a file written with ``open``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    """Temporary files next to ``paths`` (created as ``atomic_write`` creates its one) for the block to fill
    together; on a clean exit each is fsynced and renamed onto its path, on an error all are removed. Each rename
    is atomic, the set is not: a cache that writes several files this way commits them with a header written
    last."""
    paths = [Path(p) for p in paths]
    tmps: list[str] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(_create_temp(path.parent, path.name))
        yield list(tmps)
        for tmp, path in zip(tmps, paths):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
