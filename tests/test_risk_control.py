"""Risk-controlled thresholds (bench.measure.risk_control, bench.pipeline.risk_points).

1. Proof against the authors' code (tests/data/rc_eenn_official.npz, made from metodj/RC-EENN's own functions:
   tests/data/rc_eenn_official.md): the loss matrices and exits of their image-classification loop, the rows
   their naive / CRC / UCB / LTT functions select (exactly), their WSR bounds, HB p-values and ``rc_main`` test
   risks (float32 rounding).
2. The guarantees over 200 random cal/test re-splits of a fixed synthetic pool: UCB and LTT exceed epsilon on at
   most delta of the re-splits (plus binomial slack), CRC's mean test risk is at most epsilon (its guarantee is
   in expectation), and the naive procedure exceeds epsilon on far more than delta of them in a case built for it.
3. The run: risk points and rows on a synthetic task, and the command line (rows in metrics.csv; exit-2 errors).
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import methods  # noqa: F401
from bench.cli import main
from bench.core.interface import create_method
from bench.core.task import synthetic_task
from bench.measure import risk_control as RC
from bench.pipeline.risk_points import RiskSpec, is_score_rule, risk_points, risk_rows

DATA = Path(__file__).parent / "data" / "rc_eenn_official.npz"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(DATA))


def _softmax_max(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).max(-1)


# ------------------------------------------------------------------------------------------- 1. the authors' code

@pytest.mark.parametrize("loss", RC.LOSSES)
def test_loss_matrix_and_exits_equal_the_authors(ref, loss):
    logits = ref["logits"]  # [N, L, C], their layout
    scores, preds = _softmax_max(logits).T, logits.argmax(-1).T
    assert np.array_equal(RC.loss_matrix(loss, scores, preds, ref["lambdas"], ref["targets"]), ref[f"losses_{loss}"])
    assert np.array_equal(RC.grid_exits(scores, ref["lambdas"]) + 1, ref["exits"])  # theirs count from 1


def _authors_ltt(cal, eps, delta, binary):
    """Their ltt_lam's row from our p-values: the first row whose p-value exceeds delta, -1 if none."""
    p = RC.hb_p_value(np.maximum(cal, 0.0).mean(1), cal.shape[1], eps, binary)
    bad = np.flatnonzero(p > delta)
    return int(bad.min()) if len(bad) else -1


@pytest.mark.parametrize("loss", RC.LOSSES)
def test_selected_rows_equal_the_authors(ref, loss):
    cal = ref[f"losses_{loss}"][:, ref["cal_ids"][0]].astype(np.float32)  # their losses are float32
    g = cal.shape[0]
    eps, deltas = ref["eps"], ref["deltas"]
    assert [RC.naive_index(cal, e) for e in eps] == ref[f"{loss}_naive"].tolist()
    assert [RC.crc_index(cal, e) for e in eps] == ref[f"{loss}_crc"].tolist()
    assert [[RC.ucb_index(cal, e, d) for e in eps] for d in deltas] == ref[f"{loss}_ucb"].tolist()
    for b in (0, 1):
        theirs = ref[f"{loss}_ltt_binary{b}"]
        assert [[_authors_ltt(cal, e, d, bool(b)) for e in eps] for d in deltas] == theirs.tolist()
        # ours: the last certified row, one before theirs (fixed-sequence testing); all rejected: the last row
        want = np.where(theirs == -1, g - 1, np.maximum(theirs - 1, 0))
        assert [[RC.ltt_index(cal, e, d, bool(b)) for e in eps] for d in deltas] == want.tolist()
    dense = ref["eps_dense"]  # many risk levels, the float32 risks k/100 among them: ties decide there
    assert [RC.naive_index(cal, e) for e in dense] == ref[f"{loss}_naive_dense"].tolist()
    assert [RC.crc_index(cal, e) for e in dense] == ref[f"{loss}_crc_dense"].tolist()
    assert [RC.ucb_index(cal, e, 0.1) for e in dense] == ref[f"{loss}_ucb_dense"].tolist()
    assert [_authors_ltt(cal, e, 0.1, False) for e in dense] == ref[f"{loss}_ltt_dense"].tolist()
    # the selections are not trivial: they spread over the grid
    assert len(set(ref[f"{loss}_ucb"].ravel())) > 5


@pytest.mark.parametrize("loss", RC.LOSSES)
def test_bounds_equal_the_authors(ref, loss):
    cal = ref[f"losses_{loss}"][:, ref["cal_ids"][0]].astype(np.float32)
    rows = ref[f"{loss}_wsr_rows"]
    np.testing.assert_allclose([RC.ucb_wsr(cal[r], 0.1) for r in rows], ref[f"{loss}_wsr"], rtol=1e-6, atol=1e-7)
    risk = np.maximum(cal, 0.0).mean(1)[rows]
    for b in (0, 1):
        mine = np.stack([RC.hb_p_value(risk, cal.shape[1], e, bool(b)) for e in ref["eps"]])
        # float32 risks: exp(-n h1) multiplies h1's float32 rounding by n = 100
        np.testing.assert_allclose(mine, ref[f"{loss}_hb_binary{b}"], rtol=2e-5, atol=1e-9)
    # "UCB < epsilon" without the root search is the same comparison as the authors' root
    for e in ref["eps"]:
        below = RC.ucb_below(cal, e, 0.1)
        assert np.array_equal(below[rows], np.array([RC.ucb_wsr(cal[r], 0.1) < e for r in rows]))


@pytest.mark.parametrize("loss", RC.LOSSES)
def test_rc_main_test_risks_equal_the_authors(ref, loss):
    """Their ``rc_main`` trials (cal samples as it drew them) through our selection, LTT at their row."""
    losses = ref[f"losses_{loss}"].astype(np.float32)
    n = losses.shape[1]
    for name, proc in (("naive", "naive"), ("crc", "crc"), ("ucb_wsr", "ucb"), ("ltt", "ltt")):
        got = []
        for cal_ids in ref["cal_ids"]:
            test_ids = np.setdiff1d(np.arange(n), cal_ids)
            cal, test = losses[:, cal_ids], losses[:, test_ids]
            if proc == "ltt":
                rows = [_authors_ltt(cal, e, 0.1, False) for e in ref["eps"]]
            else:
                rows = [RC.select_index(proc, cal, e, 0.1, binary_loss=False) for e in ref["eps"]]
            got.append([test[r].mean() for r in rows])
        np.testing.assert_allclose(got, ref[f"{loss}_rcmain_{name}"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- 2. the guarantees

def synthetic_pool(n: int = 3000, seed: int = 7):
    """A fixed score matrix [K=4, n] with each exit's prediction [K, n]: an exit agrees with the last exit with a
    probability that grows with its score, so the disagreement risk falls as the threshold rises."""
    rng = np.random.default_rng(seed)
    k = 4
    scores = np.clip(rng.beta(2, 2, size=(k, n)) + np.linspace(0, 0.3, k)[:, None], 0, 1)
    agree = rng.uniform(size=(k, n)) < 0.55 + 0.45 * scores
    agree[-1] = True
    full = rng.integers(0, 10, size=n)
    preds = np.where(agree, full[None, :], (full[None, :] + 1 + rng.integers(0, 9, size=(k, n))) % 10)
    val = np.clip(rng.beta(2, 2, size=(k, 1000)) + np.linspace(0, 0.3, k)[:, None], 0, 1)
    grid = RC.threshold_grid(val)
    return RC.loss_matrix("disagreement", scores, preds, grid)


EPSILONS = (0.05, 0.1, 0.15)
DELTA = 0.1
N_RESPLITS = 200


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool()


@pytest.mark.parametrize("proc", ["ucb", "ltt"])
def test_high_probability_guarantee_holds_over_resplits(pool, proc):
    """P(test risk > eps) <= delta: the violation share over 200 re-splits is at most delta plus the binomial
    slack (the 99 % quantile of Binomial(200, delta) / 200 - delta = 0.05; the re-splits of one pool are not
    independent, but each one is a valid draw of a cal set, so the share's expectation is what is bounded)."""
    risks = RC.resplit_risks(pool, 500, proc, EPSILONS, DELTA, True, N_RESPLITS, seed=1)
    share = RC.violation_share(risks, EPSILONS)
    assert (share <= DELTA + RC.binomial_slack(DELTA, N_RESPLITS)).all(), share
    assert (risks.mean(0) > 0.3 * np.array(EPSILONS)).all()  # and it exits early: no trivial "never exit"


def test_crc_controls_the_expected_risk(pool):
    """CRC bounds E[test risk] <= eps (not a probability): the mean over 200 re-splits is at most eps plus three
    standard errors."""
    risks = RC.resplit_risks(pool, 500, "crc", EPSILONS, DELTA, True, N_RESPLITS, seed=1)
    se = risks.std(0, ddof=1) / np.sqrt(N_RESPLITS)
    assert (risks.mean(0) <= np.array(EPSILONS) + 3 * se).all(), risks.mean(0)


def test_naive_violates_the_guarantee(pool):
    """The naive procedure picks the last threshold whose *cal* risk is below eps: with a small cal set its test
    risk exceeds eps on far more than delta of the re-splits."""
    risks = RC.resplit_risks(pool, 100, "naive", EPSILONS, DELTA, True, N_RESPLITS, seed=1)
    share = RC.violation_share(risks, EPSILONS)
    assert (share > DELTA + RC.binomial_slack(DELTA, N_RESPLITS)).all(), share


def test_binomial_slack():
    assert RC.binomial_slack(0.1, 200) == pytest.approx(0.05)
    assert RC.binomial_slack(0.1, 2000) < 0.02


# ------------------------------------------------------------------------------------------------- 3. the run

def test_score_rules():
    assert is_score_rule("threshold") and is_score_rule("entropy")
    assert not is_score_rule("patience") and not is_score_rule("oracle") and not is_score_rule("jeidnn")


def test_risk_points_and_rows_on_a_synthetic_task():
    task = synthetic_task(n=300)
    method = create_method("threshold", {"epochs": 5}).fit(task)
    spec = RiskSpec((0.05, 0.2), 0.1, ("ucb", "naive"), "disagreement", n_resplits=20)
    points = risk_points(method, task, spec)
    assert [(p.params["risk_procedure"], p.params["risk_epsilon"]) for p in points] == [
        ("ucb", 0.05), ("ucb", 0.2), ("naive", 0.05), ("naive", 0.2)]
    cal = task.splits["cal"]
    for p in points:  # the point's threshold reproduces the cal risk it reports
        logits = method.exit_logits(cal)
        exits = method.decide(logits, p)
        pred = logits.argmax(-1).numpy()
        assert (pred[exits, np.arange(len(cal))] != pred[-1]).mean() == pytest.approx(p.params["risk_cal"])
        assert np.isfinite(p.val_macs_rel)
    assert points[1].params["threshold"] <= points[0].params["threshold"]  # a larger eps exits no later
    rows = pd.DataFrame(risk_rows(method, task, points, spec))
    assert set(rows["metric"]) == {"risk", "risk_violation_share", "risk_resplit_mean"}
    assert len(rows) == 3 * len(points) and rows["budget"].isna().all() and (rows["split"] == "test").all()
    assert rows.loc[rows["metric"] == "risk_violation_share", "n"].eq(20).all()


TINY = ["--set", "backbone.depth=3", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
        "--set", "backbone.epochs=3", "--set", "threshold.epochs=5"]


def test_cli_risk_rows(tmp_path, shared_cache):
    out = tmp_path / "out"
    rc = main(["run", "--methods", "threshold", "--risk", "0.02,0.1", "--delta", "0.2", "--risk-method", "crc,ltt",
               "--cache-dir", str(shared_cache), "--out", str(out), *TINY])
    assert rc == 0
    df = pd.read_csv(out / "metrics.csv")
    t = df[(df["method"] == "threshold") & (df["split"] == "test") & df["exit"].isna()]
    assert t["budget"].isna().all()  # --risk alone: no budget rows
    params = t.loc[t["metric"] == "risk", "params"].map(json.loads)
    assert sorted((p["risk_procedure"], p["risk_epsilon"], p["risk_delta"]) for p in params) == [
        ("crc", 0.02, 0.2), ("crc", 0.1, 0.2), ("ltt", 0.02, 0.2), ("ltt", 0.1, 0.2)]
    for p in t.loc[t["metric"] == "risk", "params"]:  # every risk point has its cost and accuracy rows
        assert {"macs_rel", "accuracy", "risk", "risk_violation_share"} <= set(t.loc[t["params"] == p, "metric"])
    assert "ε=0.02" in (out / "summary.md").read_text()
    from bench.results.report import load_runs
    from tests.test_report import assert_names_match_the_drawn_figures

    assert "risk_guarantee" in assert_names_match_the_drawn_figures(load_runs([out]))


@pytest.mark.parametrize("args, message", [
    (["--risk", "0,0.1"], "must be in (0, 1)"),
    (["--risk", "1.5"], "must be in (0, 1)"),
    (["--risk", "0.1", "--delta", "1"], "confidence delta must be in (0, 1)"),
    (["--risk", "0.1", "--risk-method", "bonferroni"], "--risk-method 'bonferroni'"),
    (["--risk", "0.1", "--risk-loss", "brier"], "--risk-loss 'brier'"),
    (["--risk", "0.1", "--methods", "threshold,patience"], "patience is not one"),
    (["--delta", "0.1"], "add --risk"),
])
def test_risk_user_errors_exit_2(tmp_path, capsys, args, message):
    assert main(["run", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
