"""Fixtures and helpers shared by the dataset-loader tests (tests/test_datasets*.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from datasets import _files


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty cache under tmp_path, no system dirs, no mirror, no retry waits, and no network (a fetch fails the
    test)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(_files.ENV_VAR, str(cache))
    monkeypatch.delenv(_files.MIRROR_ENV_VAR, raising=False)
    monkeypatch.delenv(_files.CACHE_ENV_VAR, raising=False)
    monkeypatch.setattr(_files, "_sleep", lambda s: None)
    monkeypatch.setattr(_files, "SYSTEM_DIRS", {})

    def no_network(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(_files, "_fetch", no_network)
    return cache


def patch_md5(monkeypatch, key: str, data: bytes | Path) -> str:
    raw = data.read_bytes() if isinstance(data, Path) else data
    digest = hashlib.md5(raw).hexdigest()
    monkeypatch.setitem(_files.CHECKSUMS, key, digest)
    return digest


def one_paragraph(msg: str) -> bool:
    return "\n" not in msg and "Traceback" not in msg
