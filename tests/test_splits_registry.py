"""Shared splits (determinism, disjointness, stratification, saved hash) and the registry."""
import json

import numpy as np
import pytest

from bench.base.errors import UserError
from bench.base.registry import Registry
from bench.pipeline.splits import load_or_make_splits, make_splits


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    return np.repeat(np.arange(10), rng.integers(20, 200, 10))  # unbalanced classes


def test_splits_are_a_disjoint_cover(labels):
    s = make_splits(labels, n_test=50, seed=3)
    parts = [s.train, s.val, s.cal]
    assert sum(len(p) for p in parts) == len(labels)
    assert len(np.unique(np.concatenate(parts))) == len(labels)
    assert len(s.val) == round(0.1 * len(labels)) and len(s.cal) == round(0.1 * len(labels))
    assert s.test.tolist() == list(range(50))


def test_splits_are_deterministic_and_seed_dependent(labels):
    a, b, c = make_splits(labels, 5, 0), make_splits(labels, 5, 0), make_splits(labels, 5, 1)
    assert a.sha256 == b.sha256 and all(np.array_equal(a[k], b[k]) for k in ("train", "val", "cal"))
    assert a.sha256 != c.sha256
    assert np.array_equal(a.test, c.test)  # the test set never moves


def test_splits_are_stratified(labels):
    s = make_splits(labels, 5, 0)
    share = np.bincount(labels) / len(labels)
    for part in (s.val, s.cal):
        got = np.bincount(labels[part], minlength=10)
        assert np.all(np.abs(got - share * len(part)) <= 1)


def test_saved_splits_record_the_hash(tmp_path, labels):
    s = load_or_make_splits(tmp_path, "toy", labels, 5, 7)
    (saved,) = list((tmp_path / "splits").glob("toy-*-seed7.json"))
    payload = json.loads(saved.read_text())
    assert payload["sha256"] == s.sha256 and payload["val"] == s.val.tolist()
    assert load_or_make_splits(tmp_path, "toy", labels, 5, 7).sha256 == s.sha256


def test_registry_duplicates_and_did_you_mean():
    reg = Registry("widget")
    reg.register("threshold")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("threshold")(int)
    with pytest.raises(UserError, match="Did you mean 'threshold'"):
        reg.get("threshhold")
    with pytest.raises(UserError, match="Known widgets: threshold"):
        reg.get("zzz")


def test_a_saved_split_that_differs_is_reported_and_replaced(tmp_path, labels, caplog):
    s = load_or_make_splits(tmp_path, "toy", labels, 5, 7)
    (saved,) = list((tmp_path / "splits").glob("toy-*-seed7.json"))
    payload = json.loads(saved.read_text())
    saved.write_text(json.dumps({**payload, "sha256": "0" * 64}))
    assert load_or_make_splits(tmp_path, "toy", labels, 5, 7).sha256 == s.sha256
    assert "differ from the ones this seed makes now" in caplog.text
    assert json.loads(saved.read_text())["sha256"] == s.sha256
