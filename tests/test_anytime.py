"""Product anytime (``methods/anytime.py``) and the conditional monotonicity metric against the authors' code
(metodj/AnytimeClassification at e134ae7, ``anytime_product`` and ``conditional_monotonicity_check``) on fixed
logits: ``tests/data/anytime_official.npz`` (how it was made: the .md beside it). Floats to float32 rounding,
the monotonicity shares exactly; plus the streaming form against ``decide``, the costs and the harness rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.conformance import run_checks
from bench.core.interface import OperatingPoint, create_method, resolve_points, stream_exits
from bench.core.task import SplitData, synthetic_task
from bench.measure import metrics as M
from bench.pipeline.evaluate import evaluate_method
from bench.results.files import metrics_frame
from bench.results.summary import monotonicity_table
from methods._heads import LinearHeads
from methods.anytime import ZERO_LOGIT, ProductAnytime, anytime_product_probs, exit_weights

CASES_FILE = Path(__file__).parent / "data" / "anytime_official.npz"
WEIGHTINGS = {"pa_linear": "linear", "pa_none": "none"}


def _load():
    assert CASES_FILE.is_file(), f"{CASES_FILE} is missing"
    with np.load(CASES_FILE, allow_pickle=False) as z:
        n = int(z["num_cases"])
        cases = [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"case{i}_")} for i in range(n)]
        return cases, z["thresholds"]


CASES, THRESHOLDS = _load()
CASE_IDS = list(range(len(CASES)))


def _collapsed(logits: np.ndarray) -> np.ndarray:
    """[K, N]: the clipped product is all zero (the authors' fallback rows)."""
    return (np.cumprod(np.clip(logits.astype(np.float64), 0, None), axis=0).sum(2) == 0)


def _identity_method(logits: np.ndarray, weighting: str) -> ProductAnytime:
    """A fitted ``anytime`` whose heads are the identity, so the features ARE the per-exit logits [K, N, C]."""
    k, _, c = logits.shape
    m = ProductAnytime(weighting=weighting)
    m.heads_ = LinearHeads(torch.eye(c).repeat(k - 1, 1, 1), torch.zeros(k - 1, c), np.full(k - 1, np.nan))
    m.head_weight_, m.head_bias_ = torch.eye(c), torch.zeros(c)
    m.weights_ = exit_weights(k, weighting)
    m.costs_ = np.arange(1, k + 1, dtype=np.int64) * 100
    return m


def test_the_cases_cover_several_shapes_and_the_fallback():
    assert len({c["logits"].shape for c in CASES}) == len(CASES) >= 3
    for c in CASES:
        rows = _collapsed(c["logits"]).any(0)
        assert 0 < rows.sum() < len(rows)  # some rows use the fallback, some never do


@pytest.mark.parametrize("i", CASE_IDS)
@pytest.mark.parametrize("key", list(WEIGHTINGS))
def test_product_matches_the_authors(i, key):
    c = CASES[i]
    k = c["logits"].shape[0]
    ours = anytime_product_probs(torch.from_numpy(c["logits"]), exit_weights(k, WEIGHTINGS[key])).numpy()
    np.testing.assert_allclose(ours, c[key], rtol=1e-6, atol=1e-9)
    # the fallback rows are the softmax of that exit's own logits
    kk, nn = np.nonzero(_collapsed(c["logits"]))
    np.testing.assert_allclose(ours[kk, nn], M.softmax(c["logits"][kk, nn]), rtol=1e-12)


@pytest.mark.parametrize("i", CASE_IDS)
@pytest.mark.parametrize("key", list(WEIGHTINGS))
def test_exit_logits_encode_the_authors_distribution(i, key):
    """softmax(exit_logits) is the product distribution, with finite logits: zeros as ZERO_LOGIT, collapsed rows
    as the exit's own logits."""
    c = CASES[i]
    m = _identity_method(c["logits"], WEIGHTINGS[key])
    feats = torch.from_numpy(c["logits"])
    logits = m.exit_logits(SplitData(feats, c["targets"], np.arange(feats.shape[1])))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    probs = M.softmax(logits.numpy())
    np.testing.assert_allclose(probs, c[key], rtol=1e-5, atol=1e-7)
    assert np.array_equal(probs == 0, c[key] == 0)  # ruled-out classes are exactly 0
    coll = _collapsed(c["logits"])
    assert np.array_equal(logits.numpy()[coll], c["logits"][coll])
    assert (logits.numpy()[~coll][c[key][~coll] == 0] == ZERO_LOGIT).all()


@pytest.mark.parametrize("i", CASE_IDS)
def test_monotonicity_matches_the_authors(i):
    """Our share equals the authors' percentage / 100 exactly on the same probabilities, at every threshold,
    for the product and for plain softmax; and on the distribution the harness sees (softmax of exit_logits)."""
    c = CASES[i]
    softmax = torch.softmax(torch.from_numpy(c["logits"]).double(), 2).float().double().numpy()
    for name, probs in (("pa_linear", c["pa_linear"]), ("pa_none", c["pa_none"]), ("softmax", softmax)):
        ours = [M.monotonicity_violation(probs.astype(np.float64), c["targets"], t)[0] for t in THRESHOLDS]
        np.testing.assert_array_equal(np.array(ours) * len(c["targets"]),
                                      np.round(c[f"cm_{name}"] * len(c["targets"]) / 100))
        np.testing.assert_allclose(np.array(ours) * 100, c[f"cm_{name}"], rtol=1e-12)
    for key, weighting in WEIGHTINGS.items():
        m = _identity_method(c["logits"], weighting)
        feats = torch.from_numpy(c["logits"])
        harness = M.softmax(m.exit_logits(SplitData(feats, None, np.arange(feats.shape[1]))).numpy())
        ours = [M.monotonicity_violation(harness, c["targets"], t)[0] * 100 for t in THRESHOLDS[1:]]
        np.testing.assert_allclose(ours, c[f"cm_{key}"][1:], rtol=1e-12)  # tau 0 sees float32 noise
    assert (c["cm_pa_linear"] <= c["cm_softmax"]).all()  # the point of the method


@pytest.mark.parametrize("i", CASE_IDS)
@pytest.mark.parametrize("weighting", ["linear", "none"])
def test_stream_equals_decide_on_the_cases(i, weighting):
    c = CASES[i]
    m = _identity_method(c["logits"], weighting)
    feats = torch.from_numpy(c["logits"])
    logits = m.exit_logits(SplitData(feats, None, np.arange(feats.shape[1])))
    for t in (0.3, 0.6, 0.9, 0.99):
        point = OperatingPoint({"threshold": t}, 0.5)
        exits = m.decide(logits, point)
        s_exits, s_logits = stream_exits(m, feats, point)
        assert np.array_equal(s_exits, exits)
        assert torch.equal(s_logits, logits[torch.from_numpy(exits), torch.arange(len(exits))])


def test_bench_check_passes_and_costs_count_the_product():
    results = run_checks("anytime")
    assert all(r.status == "PASS" for r in results), [(r.name, r.message) for r in results if r.status != "PASS"]
    task = synthetic_task(num_exits=4, n=200, num_classes=5)
    lin = create_method("anytime", {"epochs": 2}).fit(task)
    flat = create_method("anytime", {"epochs": 2, "weighting": "none"}).fit(task)
    thr = create_method("threshold", {"epochs": 2}).fit(task)
    c = task.num_classes
    # threshold: head + 2C per intermediate exit; anytime: head + ReLU, power, product (k > 0), sum, divide,
    # max, fallback normaliser; the last exit adds its product without the max (w = 1: no power)
    for m, ops in ((lin, np.array([6, 7, 7]) * c), (flat, np.array([5, 6, 6]) * c)):
        extra = np.cumsum(ops - 2 * c)  # beyond threshold's head + 2C at each intermediate exit
        assert np.array_equal(m.costs_ - thr.costs_, [*extra, extra[-1] + 5 * c])
    assert (lin.heads_.weight == thr.heads_.weight).all()  # the shared heads


def test_harness_writes_monotonicity_rows_and_the_report_shows_them():
    task = synthetic_task(num_exits=4, n=200, num_classes=5, noise=3.0)
    rows = []
    for name in ("anytime", "threshold"):
        m = create_method(name, {"epochs": 3}).fit(task)
        rows += evaluate_method(m, task, resolve_points(m, task, [0.5, 0.8]), splits=("test",))[0]
    df = metrics_frame(rows, "r", "synthetic", "none", {task.seed: "x"})
    mono = df[df["metric"] == "monotonicity_violation"]
    assert sorted(mono["params"].map(lambda p: json.loads(p)["tau"]).unique()) == list(M.MONOTONICITY_TAUS)
    per_point = mono.groupby(["method", "budget"]).size()
    assert (per_point == len(M.MONOTONICITY_TAUS) * task.num_exits).all()  # overall + K-1 pairs per tau
    overall = mono[mono["exit"].isna()].groupby("method")["value"].mean()
    assert overall["anytime"] < overall["threshold"]
    table = monotonicity_table(df)
    assert table is not None and "| synthetic | anytime |" in table and "τ = 0.01" in table
    assert monotonicity_table(df[df["metric"] != "monotonicity_violation"]) is None
