"""Downloads end to end with the real ``_fetch`` against a local HTTP server (127.0.0.1, in a thread).

The server hands out SVHN ``.mat`` files written in the official format (``CHECKSUMS`` entries replaced by their
md5), honours ``Range: bytes=N-`` (206) and can misbehave once per file: cut the body off half way, ignore the
range (200), answer 503, serve a corrupt body, or stall. Retry waits are recorded, not slept.
"""
from __future__ import annotations

import hashlib
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.base.errors import UserError  # noqa: E402
from datasets import _files, load_dataset  # noqa: E402

import _official_formats as off  # noqa: E402

TRAIN, TEST = "train_32x32.mat", "test_32x32.mat"


class Server:
    """Files by URL path; ``requests`` records ``(path, Range header)``; the sets/dicts make one answer misbehave."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_once: set[str] = set()  # full Content-Length, half the body, then close
        self.ignore_range: set[str] = set()  # answer 200 with the whole file to a Range request
        self.corrupt: set[str] = set()  # one byte flipped, every time
        self.fail_once: dict[str, int] = {}  # answer this HTTP error once
        self.stall: dict[str, float] = {}  # seconds to wait before answering
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path, rng = self.path, self.headers.get("Range")
                srv.requests.append((path, rng))
                time.sleep(srv.stall.get(path, 0))
                if path in srv.fail_once:
                    self.send_error(srv.fail_once.pop(path))
                    return
                data = srv.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                if path in srv.corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                start = 0
                if rng and path not in srv.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if path in srv.drop_once:
                    srv.drop_once.discard(path)
                    self.wfile.write(data[start:len(data) // 2])
                    self.close_connection = True  # HTTP/1.0: the server closes the socket now
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache, no mirror, no system dirs, recorded retry waits, and the SVHN files served under
    ``/official/`` (``URLS`` pointed there); yields a namespace with the server, the files and the waits."""
    monkeypatch.setenv(_files.ENV_VAR, str(tmp_path / "cache"))
    for var in (_files.MIRROR_ENV_VAR, _files.CACHE_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_files, "SYSTEM_DIRS", {})
    sleeps: list[float] = []
    monkeypatch.setattr(_files, "_sleep", sleeps.append)
    src = tmp_path / "src"
    src.mkdir()
    arrays = {TRAIN: off.write_svhn_mat(src / TRAIN, 40, seed=1)[0], TEST: off.write_svhn_mat(src / TEST, 7, seed=2)[0]}
    server = Server()
    for name in (TRAIN, TEST):
        data = (src / name).read_bytes()
        server.files[f"/official/{name}"] = data
        monkeypatch.setitem(_files.CHECKSUMS, name, hashlib.md5(data).hexdigest())
        monkeypatch.setitem(_files.URLS, name, f"{server.url}/official/{name}")

    class Env:
        pass

    e = Env()
    e.server, e.src, e.arrays, e.sleeps, e.cache = server, src, arrays, sleeps, tmp_path / "cache" / "svhn"
    yield e
    server.close()


def check_svhn(ds, e):
    np.testing.assert_array_equal(ds.train_x, e.arrays[TRAIN])
    np.testing.assert_array_equal(ds.test_x, e.arrays[TEST])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ resume, retry


def test_dropped_connection_resumes_with_range(env):
    env.server.drop_once.add(f"/official/{TRAIN}")
    check_svhn(load_dataset("svhn"), env)
    half = len(env.server.files[f"/official/{TRAIN}"]) // 2
    assert env.server.requests == [(f"/official/{TRAIN}", None), (f"/official/{TRAIN}", f"bytes={half}-"),
                                   (f"/official/{TEST}", None)]
    assert env.sleeps == [1] and listing(env.cache) == [TEST, TRAIN]  # no .part left


def test_server_ignoring_range_restarts_from_zero(env):
    path = f"/official/{TRAIN}"
    env.server.drop_once.add(path)
    env.server.ignore_range.add(path)
    check_svhn(load_dataset("svhn"), env)
    half = len(env.server.files[path]) // 2
    assert env.server.requests[:2] == [(path, None), (path, f"bytes={half}-")]  # answered 200: written afresh
    assert listing(env.cache) == [TEST, TRAIN]


@pytest.mark.parametrize("part", ["first-half", "complete", "stale"])
def test_part_file_from_an_earlier_run(env, part):
    """A ``.part`` left by an interrupted run: resumed (206), already complete (416, then md5-checked), or holding
    other bytes (resumed, md5 wrong, so downloaded once more from the start)."""
    data = env.server.files[f"/official/{TRAIN}"]
    env.cache.mkdir(parents=True)
    kept = {"first-half": data[:1000], "complete": data, "stale": b"x" * 1000}[part]
    (env.cache / f"{TRAIN}.part").write_bytes(kept)
    check_svhn(load_dataset("svhn"), env)
    train = [r for r in env.server.requests if r[0].endswith(TRAIN)]
    assert train[0] == (f"/official/{TRAIN}", f"bytes={len(kept)}-")
    assert len(train) == (2 if part == "stale" else 1) and listing(env.cache) == [TEST, TRAIN]


def test_temporary_http_error_is_retried_but_404_is_not(env):
    env.server.fail_once[f"/official/{TRAIN}"] = 503
    del env.server.files[f"/official/{TEST}"]
    with pytest.raises(UserError) as e:
        load_dataset("svhn")
    assert env.server.paths() == [f"/official/{TRAIN}"] * 2 + [f"/official/{TEST}"] and env.sleeps == [1]
    assert "HTTP Error 404" in str(e.value) and listing(env.cache) == [TRAIN]


def test_corrupt_body_is_a_checksum_error_and_leaves_nothing(env):
    env.server.corrupt.add(f"/official/{TRAIN}")
    with pytest.raises(UserError) as e:
        load_dataset("svhn")
    data = bytearray(env.server.files[f"/official/{TRAIN}"])
    data[100] ^= 0xFF
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert hashlib.md5(data).hexdigest() in msg and _files.CHECKSUMS[TRAIN] in msg and "nothing was saved" in msg
    assert env.server.paths() == [f"/official/{TRAIN}"] and env.sleeps == []
    assert listing(env.cache) == []  # neither train_32x32.mat nor train_32x32.mat.part


def test_concurrent_download_waits_for_the_first(env):
    """A second fetch of the same file (another process, here a thread) waits on the folder lock, then finds the
    file in place and does not download it again."""
    env.server.stall[f"/official/{TRAIN}"] = 0.3
    first = threading.Thread(target=_files.fetch_verified, args=(TRAIN, env.cache))
    first.start()
    while not env.server.requests:
        time.sleep(0.01)
    assert _files.fetch_verified(TRAIN, env.cache) == env.cache / TRAIN
    first.join()
    assert env.server.paths() == [f"/official/{TRAIN}"] and listing(env.cache) == [TRAIN]


# ------------------------------------------------------------------------------------------------ mirror


def test_mirror_base_url_is_used_instead_of_the_official_url(env, monkeypatch):
    for name in (TRAIN, TEST):
        env.server.files[f"/mirror/data/{name}"] = env.server.files[f"/official/{name}"]
    monkeypatch.setenv(_files.MIRROR_ENV_VAR, f"{env.server.url}/mirror/data")  # no trailing slash: one is added
    check_svhn(load_dataset("svhn"), env)
    assert env.server.paths() == [f"/mirror/data/{TRAIN}", f"/mirror/data/{TEST}"]  # official never contacted


def test_mirror_url_failures_fall_back_to_the_official_url(env, monkeypatch, caplog):
    env.server.files[f"/mirror/{TRAIN}"] = env.server.files[f"/official/{TRAIN}"]
    env.server.corrupt.add(f"/mirror/{TRAIN}")  # wrong md5 from the mirror; TEST is missing there (404)
    monkeypatch.setenv(_files.MIRROR_ENV_VAR, f"{env.server.url}/mirror/")
    with caplog.at_level(logging.WARNING, logger="datasets._files"):
        check_svhn(load_dataset("svhn"), env)
    assert env.server.paths() == [f"/mirror/{TRAIN}", f"/official/{TRAIN}", f"/mirror/{TEST}", f"/official/{TEST}"]
    assert "not the official" in caplog.text and "HTTP Error 404" in caplog.text and "Trying the official" in caplog.text


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_mirror_local_folder(env, monkeypatch, caplog, tmp_path, form):
    """Files in the folder are copied (md5-checked); one missing there is named and fetched from the official URL."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / TRAIN).write_bytes((env.src / TRAIN).read_bytes())
    monkeypatch.setenv(_files.MIRROR_ENV_VAR, str(mirror) if form == "path" else mirror.as_uri())
    with caplog.at_level(logging.WARNING, logger="datasets._files"):
        check_svhn(load_dataset("svhn"), env)
    assert env.server.paths() == [f"/official/{TEST}"]  # TRAIN never requested from the official URL
    assert f"folder {mirror} has no {TEST}" in caplog.text and listing(env.cache) == [TEST, TRAIN]


def test_mirror_local_folder_with_wrong_file_and_offline(env, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / TRAIN).write_bytes(b"not the file")
    monkeypatch.setenv(_files.MIRROR_ENV_VAR, str(mirror))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    offline = f"http://127.0.0.1:{closed.getsockname()[1]}/train_32x32.mat"  # nothing listens: refused
    closed.close()
    monkeypatch.setitem(_files.URLS, TRAIN, offline)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        load_dataset("svhn")
    msg = str(e.value)
    assert time.monotonic() - t0 < 3 and env.sleeps == []
    assert f"copy of {mirror / TRAIN} has md5 {hashlib.md5(b'not the file').hexdigest()}" in msg
    assert offline in msg and "refused" in msg and _files.MIRROR_ENV_VAR in msg and listing(env.cache) == []


# ------------------------------------------------------------------------------------- progress, location


def test_progress_bar_shows_size_and_rate(env, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py hides bars by default
    load_dataset("svhn")
    err = capsys.readouterr().err
    size = len(env.server.files[f"/official/{TRAIN}"])
    assert TRAIN in err and TEST in err and "100%" in err and "B/s" in err
    assert f"{size / 1024:.0f}k" in err or f"{size / 1024:.1f}k" in err  # total from Content-Length


def test_download_location(monkeypatch, tmp_path):
    monkeypatch.delenv(_files.ENV_VAR, raising=False)
    monkeypatch.delenv(_files.CACHE_ENV_VAR, raising=False)
    assert _files.cache_root() == Path("~/.cache/bench/data").expanduser().absolute()
    monkeypatch.setenv(_files.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert _files.cache_root() == tmp_path / "c" / "data"
    with _files.harness_cache(tmp_path / "run"):  # what load_dataset(cache_dir=...) sets
        assert _files.cache_dir("svhn") == tmp_path / "run" / "data" / "svhn"
        monkeypatch.setenv(_files.ENV_VAR, str(tmp_path / "d"))  # BENCH_DATA_DIR wins
        assert _files.cache_root() == tmp_path / "d"
    monkeypatch.delenv(_files.ENV_VAR)
    assert _files.cache_root() == tmp_path / "c" / "data"


def test_download_goes_under_cache_dir(env, monkeypatch, tmp_path):
    monkeypatch.delenv(_files.ENV_VAR)
    monkeypatch.setenv(_files.CACHE_ENV_VAR, str(tmp_path / "harness"))
    check_svhn(load_dataset("svhn"), env)  # $BENCH_CACHE_DIR/data
    assert listing(tmp_path / "harness" / "data" / "svhn") == [TEST, TRAIN]
    check_svhn(load_dataset("svhn", cache_dir=tmp_path / "run"), env)  # load_dataset(cache_dir=) beats it
    assert listing(tmp_path / "run" / "data" / "svhn") == [TEST, TRAIN]
    assert len(env.server.requests) == 4
