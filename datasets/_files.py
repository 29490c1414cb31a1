"""Finding, verifying and downloading the official dataset files.

* :data:`CHECKSUMS` holds the official md5 of every file a loader reads (keys are file names, or
  ``folder/member`` for the files inside the CIFAR archives). Every file read from disk is checked against it
  before it is parsed; tests replace entries with the md5 of small generated files to exercise that path.
* Search order for a dataset's files: ``data_dir``, ``data_dir/<subdir>``, the cache ``<root>/<subdir>``, then
  :data:`SYSTEM_DIRS` (Debian's ``dataset-fashion-mnist`` package installs into
  ``/usr/share/datasets/fashion-mnist``). The cache ``<root>`` (also where downloads go) is ``$BENCH_DATA_DIR``
  if set, else ``<harness cache>/data`` where the harness cache is ``load_dataset(cache_dir=...)`` or
  ``$BENCH_CACHE_DIR``, else ``~/.cache/bench/data``.
* Missing files are downloaded into the cache from :data:`URLS` with a progress bar (size and rate, on stderr;
  ``TQDM_DISABLE=1`` hides it). The bytes go to ``<name>.part`` in the destination folder, never under the final
  name; the complete file is md5-checked and only then renamed into place, so the cache never holds a partial
  or unverified file under a name a loader reads. On a checksum mismatch the ``.part`` file is deleted and the
  error gives both md5s.
* Network problems: connecting has a short timeout (:data:`CONNECT_TIMEOUT_S`), so an offline machine fails at
  once (a host that cannot be resolved or reached is not retried); once connected, each read may wait
  :data:`READ_TIMEOUT_S`. A download cut short (timeout, reset, connection closed early, HTTP 408/429/5xx) is
  retried after 1, 2 and 4 s (:data:`BACKOFF_S`, up to :data:`ATTEMPTS` attempts in a row that add no bytes),
  resuming with ``Range: bytes=N-`` when the server answers 206 (an answer of 200 starts again from zero). A
  ``.part`` file left by an interrupted run is resumed the same way by the next run; if a resumed file fails
  the md5 check it is downloaded once more from the start. Concurrent downloads into one folder wait for each
  other (``flock``).
* ``BENCH_DATA_MIRROR`` (optional) names a mirror tried before the official URL: a base URL
  (``http://host/path/``; the file name is appended) or a local folder (``/path`` or ``file:///path``; the file
  is copied from there). Its copy gets the same md5 check. If the mirror fails (missing file, HTTP error, wrong
  md5), a warning says so and the official URL is used.
* :func:`_fetch` is the only function that touches the network (tests replace it).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import logging
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from tqdm.auto import tqdm

from bench.base.errors import UserError
from bench.base.hashing import file_digest

try:  # POSIX only; elsewhere concurrent downloads are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ENV_VAR = "BENCH_DATA_DIR"
CACHE_ENV_VAR = "BENCH_CACHE_DIR"  # the harness cache (--cache-dir's default); downloads go to its data/
MIRROR_ENV_VAR = "BENCH_DATA_MIRROR"
DEFAULT_CACHE_ROOT = "~/.cache/bench/data"
CONNECT_TIMEOUT_S = 5.0  # connecting (DNS, TCP, TLS): short, so that an offline machine fails at once
READ_TIMEOUT_S = 60.0  # each read once connected (waiting for the status line, then every chunk)
ATTEMPTS = 4  # tries in a row that add no bytes before a download gives up
BACKOFF_S = (1.0, 2.0, 4.0)  # sleep before the 2nd, 3rd, 4th try
RETRY_HTTP_CODES = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 1 << 18
PART_SUFFIX = ".part"
_sleep = time.sleep  # tests replace it so retries do not wait

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"

CHECKSUMS: dict[str, str] = {
    # Fashion-MNIST: the official .gz files, and their decompressed contents (accepted when a copy was
    # re-compressed, e.g. Debian's package, whose gzip headers differ from the official ones).
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    # CIFAR-10, python version: the archive and its members.
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    # CIFAR-100, python version.
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
    # SVHN, cropped digits (format 2).
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}

URLS: dict[str, str] = {
    **{
        f"{stem}.gz": FASHION_MNIST_URL + f"{stem}.gz"
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte")
    },
    "cifar-10-python.tar.gz": CIFAR10_URL,
    "cifar-100-python.tar.gz": CIFAR100_URL,
    "train_32x32.mat": SVHN_URL + "train_32x32.mat",
    "test_32x32.mat": SVHN_URL + "test_32x32.mat",
}

# Read-only locations searched after the cache, per cache subdir.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


# ----------------------------------------------------------------------------------------------- checksums


def env_number(var: str, default, parse, valid, problem: str):
    """``$var`` read with ``parse`` (``int`` or ``float``) when set and not blank, else ``default``. A value that
    does not parse, or that ``valid`` refuses, is a UserError: ``var='raw'`` then ``problem``."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise UserError(f"{var}={raw!r} {problem}")
    return value


def md5_file(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def checksum_error(where: str, key: str, actual: str, official_from: str = "") -> UserError:
    source = official_from or URLS.get(key) or "the official source"
    return UserError(
        f"Checksum mismatch for {where}: md5 is {actual}, expected the official {CHECKSUMS[key]} ({key}). "
        f"The file is corrupt, incomplete or not the official release. Delete it so it is downloaded again, "
        f"or replace it with the official file from {source}."
    )


def verify_file(path: Path, key: str) -> str:
    """md5 of ``path`` (chunked); raises UserError unless it is ``CHECKSUMS[key]``."""
    actual = md5_file(path)
    if actual != CHECKSUMS[key]:
        raise checksum_error(str(path), key, actual)
    return actual


def verify_bytes(data: bytes, key: str, where: str, official_from: str = "") -> str:
    actual = md5_bytes(data)
    if actual != CHECKSUMS[key]:
        raise checksum_error(where, key, actual, official_from)
    return actual


# ------------------------------------------------------------------------------------------------ location


# The harness cache folder given to ``load_dataset(cache_dir=...)`` (set for the duration of that call).
_HARNESS_CACHE: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("bench_cache_dir", default=None)


@contextlib.contextmanager
def harness_cache(cache_dir: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, the cache root is ``cache_dir/data`` (unless ``$BENCH_DATA_DIR`` is set); None: no change."""
    token = _HARNESS_CACHE.set(Path(cache_dir) if cache_dir is not None else _HARNESS_CACHE.get())
    try:
        yield
    finally:
        _HARNESS_CACHE.reset(token)


def cache_root() -> Path:
    """``$BENCH_DATA_DIR``, else ``<harness cache>/data`` (``load_dataset(cache_dir=)`` or ``$BENCH_CACHE_DIR``),
    else ``~/.cache/bench/data``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    harness = _HARNESS_CACHE.get() or os.environ.get(CACHE_ENV_VAR)
    if harness:
        return (Path(harness).expanduser() / "data").absolute()
    return Path(DEFAULT_CACHE_ROOT).expanduser().absolute()


def cache_dir(subdir: str) -> Path:
    return cache_root() / subdir


def search_dirs(subdir: str, data_dir: Optional[Path]) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        base = Path(data_dir).expanduser().absolute()
        dirs += [base, base / subdir]
    dirs.append(cache_dir(subdir))
    dirs += [Path(d) for d in SYSTEM_DIRS.get(subdir, ())]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


@dataclass(frozen=True)
class Need:
    """One thing a loader needs, satisfiable by any of several forms.

    ``names`` are paths relative to a search dir, in order of preference; a name that is a directory counts
    only if it holds all of ``members`` ("." means the search dir itself). ``download`` is the file fetched
    into the cache when no form is found; ``describe`` is how error messages name it.
    """

    describe: str
    names: tuple[str, ...]
    download: str
    members: tuple[str, ...] = ()


def _match(d: Path, need: Need) -> Optional[Path]:
    for name in need.names:
        p = d if name == "." else d / name
        if p.is_dir():
            if need.members and all((p / m).is_file() for m in need.members):
                return p
        elif p.is_file():
            return p
    return None


def _looked_for(dataset: str, needs: list[Need], dirs: list[Path]) -> str:
    return (
        f"{dataset}: could not find {', '.join(n.describe for n in needs)}. "
        f"Looked in: {', '.join(str(d) for d in dirs)}."
    )


def locate(dataset: str, subdir: str, needs: list[Need], data_dir: Optional[Path], download: bool) -> list[Path]:
    """Path of each need (first match in :func:`search_dirs` order), downloading missing ones into the cache.

    A found file is not checked here: the loader verifies its md5 when it reads it, and a mismatch is an error
    (it does not fall through to the next location, which would hide a corrupt file).
    """
    dirs = search_dirs(subdir, data_dir)
    found: list[Optional[Path]] = []
    for need in needs:
        found.append(next((p for d in dirs if (p := _match(d, need)) is not None), None))
    missing = [n for n, p in zip(needs, found) if p is None]
    if not missing:
        return [p for p in found if p is not None]

    dest_dir = cache_dir(subdir)
    urls = ", ".join(URLS[n.download] for n in missing)
    if not download:
        raise UserError(
            f"{_looked_for(dataset, missing, dirs)} Downloads are disabled (--no-download). To fix: pass "
            f"--data-dir DIR where DIR (or DIR/{subdir}) holds these files (official source: {urls}), or allow "
            f"downloads (drop --no-download) to fetch them into {dest_dir}."
        )
    out = []
    for need, path in zip(needs, found):
        if path is None:
            try:
                path = fetch_verified(need.download, dest_dir)
            except UserError as e:
                raise UserError(
                    f"{_looked_for(dataset, missing, dirs)} {e} To fix: download "
                    f"{', '.join(f'{n.download} from {URLS[n.download]}' for n in missing)} on a machine with "
                    f"network access and pass --data-dir DIR holding them (or put them in {dest_dir}), set "
                    f"{MIRROR_ENV_VAR} to a folder or base URL that holds them, or retry when the network is "
                    f"reachable."
                ) from None
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------- download



class IncompleteDownload(ConnectionError):
    """The server closed the connection before the whole body arrived (retried, resuming)."""


class _GaveUp(Exception):
    def __init__(self, error: BaseException, tries: int):
        super().__init__(str(error))
        self.error, self.tries = error, tries


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIABLE_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


class _ReadTimeout:
    """Connection mixin: connect under the request's (short) timeout, then let each read wait READ_TIMEOUT_S."""

    sock: object

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(READ_TIMEOUT_S)  # type: ignore[attr-defined]


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mib(n: int) -> str:
    """A byte count for messages: ``123 bytes``, ``60.1 KiB``, ``161.2 MiB``."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _progress_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _progress(name: str, total: Optional[int], initial: int) -> tqdm:
    """A byte progress bar on stderr (size, rate, time left); in a log file (not a terminal) it updates every 10 s."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, mininterval=0.1 if tty else 10.0, disable=_progress_disabled(),
                file=sys.stderr)


def _copy_body(src, dest: Path, mode: str, total: Optional[int], initial: int) -> None:
    name = dest.name.removesuffix(PART_SUFFIX)
    with open(dest, mode) as f, _progress(name, total, initial) as bar:
        while chunk := src.read(CHUNK):
            f.write(chunk)
            bar.update(len(chunk))


def _fetch(url: str, dest: str) -> None:
    """Download ``url`` into ``dest``, continuing a partial ``dest`` with ``Range: bytes=N-`` when the server
    answers 206, else writing it from the start. Raises on any failure, leaving what arrived in ``dest``. The only
    network access (tests replace it)."""
    path = Path(dest)
    while True:
        offset = _size(path)
        request = urllib.request.Request(url)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)  # per call: proxies from the environment
        try:
            response = opener.open(request, timeout=CONNECT_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not offset:
                raise
            m = _UNSATISFIABLE_RANGE.match(e.headers.get("Content-Range", ""))
            e.close()
            if m and int(m.group(1)) == offset:
                return  # the partial file already holds the whole body (the md5 check decides)
            log.warning("%s: the partial file %s (%s) does not fit the file on the server; starting again from zero",
                        url, path, _mib(offset))
            path.unlink()
            continue
        with response:
            status = getattr(response, "status", None)  # None for file:// URLs
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", "")) if status == 206 else None
            if m and int(m.group(1)) == offset:
                total = None if m.group(3) == "*" else int(m.group(3))
                if offset:
                    log.warning("resuming the download of %s at %s%s", url, _mib(offset),
                                f" of {_mib(total)}" if total else "")
                mode = "ab" if offset else "wb"
            elif status == 206:  # not the range asked for
                if not offset:
                    raise OSError(f"{url} answered a request for the whole file with part of it "
                                  f"(Content-Range {response.headers.get('Content-Range')!r})")
                log.warning("%s answered with an unexpected range; starting again from zero", url)
                path.unlink(missing_ok=True)
                continue
            else:
                if offset:
                    log.warning("%s does not resume downloads (HTTP %s); starting again from zero", url, status)
                length = response.headers.get("Content-Length", "")
                total, offset, mode = (int(length) if length.isdigit() else None), 0, "wb"
            _copy_body(response, path, mode, total, offset)
        got = _size(path)
        if total is not None and got < total:
            raise IncompleteDownload(f"the connection closed after {got} of {total} bytes")
        return


def _retryable(e: BaseException) -> bool:
    """Whether a failed try may succeed if repeated: cut short once connected (timeout, reset, early close, TLS
    error) or a temporary HTTP error. Not: DNS failure, refused or unreachable host, connect timeout (urllib wraps these
    in URLError), other HTTP errors, local file errors."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in RETRY_HTTP_CODES
    if isinstance(e, (urllib.error.URLError, ConnectionRefusedError)):
        return False
    return isinstance(e, (TimeoutError, ConnectionError, http.client.HTTPException, ssl.SSLError))


def _download(url: str, part: Path) -> bool:
    """``_fetch`` with retries (:data:`BACKOFF_S`); a try that adds bytes starts the count again. Returns whether
    any try continued from bytes already in ``part``; raises :class:`_GaveUp`."""
    continued, tries, in_a_row, best = False, 0, 0, _size(part)
    while True:
        tries += 1
        continued = continued or _size(part) > 0
        try:
            _fetch(url, str(part))
            return continued
        except Exception as e:  # noqa: BLE001  classified below; everything ends as _GaveUp
            now = _size(part)
            if now > best:
                best, in_a_row = now, 0
            in_a_row += 1
            if not _retryable(e) or in_a_row >= ATTEMPTS:
                raise _GaveUp(e, tries) from e
            delay = BACKOFF_S[min(in_a_row, len(BACKOFF_S)) - 1]
            log.warning("downloading %s: %s: %s; trying again in %g s (%s received so far, try %d of %d)",
                        url, type(e).__name__, e, delay, _mib(now), in_a_row + 1, ATTEMPTS)
            _sleep(delay)


def _sources(key: str) -> list[tuple[str, str | Path]]:
    """``(kind, where)`` to try in order: ``$BENCH_DATA_MIRROR``'s copy ("url" or "folder"), then the official URL."""
    out: list[tuple[str, str | Path]] = []
    mirror = os.environ.get(MIRROR_ENV_VAR, "").strip()
    if mirror:
        parsed = urllib.parse.urlsplit(mirror)
        if parsed.scheme == "file":
            out.append(("folder", Path(urllib.request.url2pathname(parsed.path)) / key))
        elif len(parsed.scheme) > 1 and parsed.netloc:  # http(s)://host/... (not a Windows drive letter)
            out.append(("url", (mirror if mirror.endswith("/") else mirror + "/") + urllib.parse.quote(key)))
        else:
            out.append(("folder", Path(mirror).expanduser().absolute() / key))
    out.append(("url", URLS[key]))
    return out


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (waiting for another process downloading into it); where locks
    are unsupported, go on without one."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("waiting for another process that is downloading into %s", folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
                fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _get(kind: str, where: str | Path, part: Path, dest: Path, key: str) -> Optional[str]:
    """Fetch one source into ``part``, check its md5, rename it to ``dest``. None on success, else one sentence
    saying what went wrong (``part`` deleted if its md5 was wrong, kept if the download was cut short)."""
    expected = CHECKSUMS[key]
    if kind == "folder" and not Path(where).is_file():
        return f"The {MIRROR_ENV_VAR} folder {Path(where).parent} has no {key}."
    for again in (False, True):
        try:
            if kind == "folder":
                log.warning("copying %s -> %s (%s)", where, dest, MIRROR_ENV_VAR)
                with open(where, "rb") as src:
                    _copy_body(src, part, "wb", os.fstat(src.fileno()).st_size, 0)
                continued = False
            else:
                log.warning("downloading %s -> %s", where, dest)
                continued = _download(str(where), part)
            actual = md5_file(part)
            if actual == expected:
                with open(part, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(part, dest)
                return None
        except _GaveUp as g:
            tries = f" after {g.tries} tries" if g.tries > 1 else ""
            return f"Downloading {where} to {dest} failed{tries} ({type(g.error).__name__}: {g.error})."
        except OSError as e:  # unreadable mirror file, disk full, unwritable cache
            return f"{'Copying' if kind == 'folder' else 'Saving'} {where} to {dest} failed ({type(e).__name__}: {e})."
        part.unlink()
        if not continued or again:
            what = "copy of" if kind == "folder" else "download of"
            return f"The {what} {where} has md5 {actual}, not the official {expected} ({key}), so nothing was saved."
        log.warning("%s: the resumed download has md5 %s, not the official %s; downloading it again from the start",
                    where, actual, expected)
    raise AssertionError("unreachable")


def fetch_verified(key: str, dest_dir: Path) -> Path:
    """Fetch ``key`` into ``dest_dir/key``: from ``$BENCH_DATA_MIRROR`` first if set, then ``URLS[key]``; via
    ``dest_dir/key.part`` (resumed across tries and runs), md5 check, atomic rename. Raises UserError."""
    dest = dest_dir / key
    part = dest_dir / (key + PART_SUFFIX)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create the download folder {dest_dir} ({type(e).__name__}: {e}).") from None
    with _folder_lock(dest_dir):
        if dest.is_file():
            return dest  # another process fetched it while this one waited (its md5 is checked when read)
        sources = _sources(key)
        problems = []
        for i, (kind, where) in enumerate(sources):
            problem = _get(kind, where, part, dest, key)
            if problem is None:
                return dest
            problems.append(problem)
            if i + 1 < len(sources):
                log.warning("%s Trying the official URL %s instead.", problem, URLS[key])
        kept = _size(part)
        if kept:
            problems.append(f"The {kept} bytes received so far are kept in {part}; the next download resumes there.")
        else:
            part.unlink(missing_ok=True)
        raise UserError(" ".join(problems))
