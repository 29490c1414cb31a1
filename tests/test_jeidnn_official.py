"""JEI-DNN's pure pieces against outputs of the authors' code (github.com/networkslab/dynn, HEAD 8dd598d) on fixed
inputs: ``tests/data/jeidnn_official_cases.npz`` (a copy of ``../shared/reference/``; its format is in the .md
beside it), or the file named by ``$JEIDNN_OFFICIAL_CASES``, and ``tests/data/jeidnn_official_cases_seed2.npz``
(same format, inputs from other seeds, outputs from the official code too; how, in its .md). Integers must match
exactly, floats within 1e-5 relative; the test fails when a file is missing or holds no case.

The official method's own rules are what is checked (``JEIDNN.exits_from_gates``, ``oracle_costs``,
``positive_weights``, ``gate_phase_loss``, ``im_phase_loss``), so a change to what ``jeidnn`` trains with fails
here. Known differences, asserted rather than skipped: where the official IM loss is NaN (a sample with
sum_l P_l CE_l = 0) the project falls back to plain CE. The official warm-up loss includes the frozen final
head's CE; the project's warm-up trains the IMs only, so it leaves that constant term out.

The schedule tests below check the fitted method's log of every mini-batch against numbers worked out by hand
from the official rules (train_dynn.py, our_train_helper.py at HEAD 8dd598d).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.core.interface import create_method
from bench.core.task import synthetic_task
from methods._jeidnn_parts import (_ce as ce_of, _im_logits, exit_probabilities, gate_features, gate_targets,
                                   official_gate_phase, official_joint_epochs, official_joint_lr, oracle_exits)

CASES = Path(os.environ.get("JEIDNN_OFFICIAL_CASES", Path(__file__).parent / "data" / "jeidnn_official_cases.npz"))
CASES_SEED2 = Path(__file__).parent / "data" / "jeidnn_official_cases_seed2.npz"
CASE_FILES = {"shared": CASES, "seed2": CASES_SEED2}
RTOL, ATOL = 1e-5, 1e-6


def load_cases(path: Path = CASES) -> list[dict[str, np.ndarray]]:
    assert path.is_file(), f"official JEI-DNN cases not found at {path} (set JEIDNN_OFFICIAL_CASES)"
    with np.load(path, allow_pickle=False) as z:
        n = int(z["num_cases"])
        cases = [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"case{i}_")} for i in range(n)]
    assert cases and all(cases), f"{path} holds no case"
    return cases


CASES_BY_FILE = {name: load_cases(path) if path.is_file() else [] for name, path in CASE_FILES.items()}
# (file, case index) for every case of every file, e.g. "seed2-3"
CASE_PARAMS = [pytest.param(name, i, id=f"{name}-{i}") for name, cases in CASES_BY_FILE.items()
               for i in range(len(cases))]
OFFICIAL = create_method("jeidnn")



@pytest.mark.parametrize("name", list(CASE_FILES))
def test_the_cases_file_is_there_and_not_empty(name):
    cases = load_cases(CASE_FILES[name])
    assert len(cases) >= 1
    shapes = {(c["im_logits"].shape[0] + 1, c["im_logits"].shape[2]) for c in cases}  # (K, C)
    assert len(shapes) > 1  # several exit counts and class counts


def _ce(logits: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Per-sample CE [..., N] in float64."""
    return F.cross_entropy(torch.as_tensor(logits, dtype=torch.float64).flatten(0, -2),
                           torch.as_tensor(y).repeat(int(np.prod(logits.shape[:-2])) if logits.ndim > 2 else 1),
                           reduction="none").reshape(logits.shape[:-1])


@pytest.mark.parametrize("name, i", CASE_PARAMS)
def test_gate_pieces_match_the_official_code(name, i):
    c = CASES_BY_FILE[name][i]
    feats = gate_features(torch.as_tensor(c["im_logits"]))  # float32, as the official code
    np.testing.assert_allclose(feats.numpy(), c["out_gate_features"], rtol=RTOL, atol=ATOL)
    terms = feats.double() * torch.as_tensor(c["gate_w"], dtype=torch.float64)[:, None, :]
    bias = torch.as_tensor(c["gate_b"], dtype=torch.float64)[:, None]
    z = terms.sum(-1) + bias
    # a gate logit near 0 is a difference of terms of size ~1 summed in float32 by the official code: the
    # tolerance is relative to the size of the terms, not of their (cancelling) sum
    scale = terms.abs().sum(-1) + bias.abs()
    assert ((z - torch.as_tensor(c["out_gate_logits"], dtype=torch.float64)).abs() <= RTOL * scale + ATOL).all()
    g = torch.sigmoid(z)
    p = exit_probabilities(g)
    np.testing.assert_allclose(p[:-1].numpy(), c["out_exit_prob"], rtol=RTOL, atol=ATOL)
    assert np.array_equal(OFFICIAL.exits_from_gates(g.numpy()), c["out_exit"])


@pytest.mark.parametrize("name, i", CASE_PARAMS)
def test_oracle_targets_and_positive_weights_match_the_official_code(name, i):
    c = CASES_BY_FILE[name][i]
    k = c["im_logits"].shape[0] + 1
    # CE as the method computes it for its oracle: in float32 like the official code, then widened (``_val_ce``).
    # In float64 a near one-hot row's CE is ~1e-13 where float32 gives exactly 0 at two exits, and the oracle's
    # first-on-ties choice flips (seed2 cases 4 and 7, at lambda 0)
    y = torch.as_tensor(c["targets"])
    ce = torch.cat([ce_of(torch.as_tensor(c["im_logits"]), y), ce_of(torch.as_tensor(c["final_logits"]), y)[None]])
    ce = ce.double().numpy()
    # the method's oracle costs: measured IM costs, the last exit exactly 1 whatever its measured cost
    costs = OFFICIAL.oracle_costs(torch.tensor(np.concatenate([c["im_costs"], [1.07]]))).numpy()
    assert costs[-1] == 1.0
    oracle = oracle_exits(ce, costs, float(c["lam"]))
    assert np.array_equal(oracle, c["out_oracle"])
    assert np.array_equal(gate_targets(oracle, k).astype(np.int64), c["out_gate_targets"])
    counts = np.bincount(oracle, minlength=k)[:-1]
    assert np.array_equal(counts, c["out_oracle_counts"])
    np.testing.assert_allclose(OFFICIAL.positive_weights(torch.as_tensor(counts), len(oracle)).double().numpy(),
                               c["out_pos_weights"], rtol=RTOL)


@pytest.mark.parametrize("name, i", CASE_PARAMS)
def test_gate_phase_loss_matches_the_official_code(name, i):
    """The official helper's first-epoch loss: positive weights from counts of 1 per gate (weight = the cap, 5),
    BCE with logits averaged over gates and samples."""
    c = CASES_BY_FILE[name][i]
    z = torch.as_tensor(c["out_gate_logits"], dtype=torch.float64)
    t = torch.as_tensor(c["out_gate_targets"], dtype=torch.float64)
    g_count, n = z.shape
    first = OFFICIAL.positive_weights(torch.ones(g_count), n).double()
    assert first.tolist() == [5.0] * g_count
    official = float(c["out_gate_loss_pos_weight_1"])
    assert float(OFFICIAL.gate_phase_loss(z, t, first)) == pytest.approx(official, rel=RTOL)


@pytest.mark.parametrize("name, i", CASE_PARAMS)
def test_im_and_warmup_losses_match_the_official_code(name, i):
    c = CASES_BY_FILE[name][i]
    g_count = c["im_logits"].shape[0]
    ce = _ce(c["im_logits"], c["targets"])  # [G, N]
    p = torch.as_tensor(c["out_exit_prob"], dtype=torch.float64)
    ours = float(OFFICIAL.im_phase_loss(ce, p))
    official = float(c["out_im_loss"])
    # the attached ratio cancels the weights: plain CE averaged over samples and exits
    assert ours == pytest.approx(float(ce.mean()), rel=RTOL)
    if np.isnan(official):  # 0/0 in the official code; here those samples fall back to plain CE
        assert ((p * ce).sum(0) == 0).any() and np.isfinite(ours)
    else:
        assert ours == pytest.approx(official, rel=RTOL)
    k = g_count + 1
    weights = torch.arange(k, 1, -1, dtype=torch.float64)  # K, K-1, ..., 2 for IMs 0..K-2
    warm = float((weights * ce.mean(-1)).sum() + _ce(c["final_logits"][None], c["targets"]).mean())
    assert warm == pytest.approx(float(c["out_warmup_loss"]), rel=RTOL)


# -- the official schedule, by hand ------------------------------------------------------------------------------

def test_schedule_rules_by_hand():
    # phases switch every 200 batches on the index within the epoch, gate phase first
    assert [official_gate_phase(b, 200) for b in (0, 199, 200, 399, 400, 600)] == [True, True, False, False, True,
                                                                                   False]
    assert [official_gate_phase(b, 2) for b in range(6)] == [True, True, False, False, True, True]
    # num_epoch includes the warm-up
    assert (official_joint_epochs(20, 6), official_joint_epochs(20, 2), official_joint_epochs(3, 6)) == (14, 18, 0)
    # cosine over T_max = num_epoch = 8, stepped per joint epoch: 2e-4 + 0.0098 (1 + cos(pi e / 8)) / 2
    expected = [0.01, 0.00962701, 0.00856482, 0.00697515]
    assert [official_joint_lr(e, 0.01, 2e-4, 8) for e in range(4)] == pytest.approx(expected, abs=1e-8)


@pytest.fixture(scope="module")
def scheduled():
    """320 training samples = 5 mini-batches of 64 per epoch; phases every 2 batches; num_epoch 8 with a warm-up
    that runs all its 3 epochs (patience 100)."""
    task = synthetic_task(n=320, noise=2.5)
    cfg = {"lambdas": [0.1, 1.0], "epochs": 8, "warmup_epochs": 3, "warmup_patience": 100, "alternate_every": 2}
    return task, create_method("jeidnn", cfg).fit(task)


def test_fitted_schedule_phases_lrs_epochs(scheduled):
    task, m = scheduled
    assert m.warmup_epochs_run_ == 3 and m.joint_epochs_run_ == 5  # 8 - 3
    assert m.warmup_lrs_.tolist() == [0.01] * 15  # 3 epochs x 5 batches at the constant lr
    log = m.schedule_  # (joint epoch, batch in epoch, gate phase, lr) per mini-batch
    assert log.shape == (25, 4)
    assert log[:, 0].tolist() == [e for e in range(1, 6) for _ in range(5)]
    assert log[:, 1].tolist() == [0, 1, 2, 3, 4] * 5
    assert log[:, 2].tolist() == [1, 1, 0, 0, 1] * 5  # the same in every epoch: the counter restarts
    lrs = [0.01, 0.00962701, 0.00856482, 0.00697515, 0.00510000]
    np.testing.assert_allclose(log[:, 3], np.repeat(lrs, 5), atol=1e-8)
    # the last epoch is kept, whatever the validation objective did
    assert m.best_epoch_.tolist() == [5, 5]
    assert m.val_objective_.tolist() == m.val_objective_history_[-1].tolist()


def test_fitted_positive_weights_start_at_the_cap_and_use_exact_counts(scheduled):
    task, m = scheduled
    assert m.pos_weight_history_.shape == (6, 2, 3)
    assert (m.pos_weight_history_[0] == 5.0).all()
    val = task.splits["val"]
    yv = torch.from_numpy(val.labels)
    costs = torch.tensor(m.gate_costs_)
    assert costs[-1] == 1.0
    for j, lam in enumerate(m.lambdas_):  # the final refresh, recomputed from the kept model
        ce = torch.cat([ce_of(_im_logits(val.features[:3], m.im_w_[j], m.im_b_[j]), yv),
                        ce_of(task.final_logits(val), yv)[None]]).double()
        counts = np.bincount(oracle_exits(ce, costs, lam).numpy(), minlength=4)[:3]
        n = len(yv)
        expected = np.minimum((n - np.maximum(counts, 0.1)) / np.maximum(counts, 0.1), 5.0)
        np.testing.assert_allclose(m.pos_weight_history_[-1, j], expected, rtol=1e-6)


def test_ims_untrained_after_warmup_when_an_epoch_has_at_most_200_batches():
    task = synthetic_task(n=2000, noise=2.5)  # 32 mini-batches per epoch: only gate phases
    m = create_method("jeidnn", {"lambdas": [0.1], "epochs": 6, "warmup_epochs": 2}).fit(task)
    assert (m.schedule_[:, 2] == 1).all() and m.joint_epochs_run_ > 0
    assert torch.equal(m.im_w_[0], m.warm_w_) and torch.equal(m.im_b_[0], m.warm_b_)


def test_no_warmup_epoch_gives_every_epoch_to_the_joint_phase():
    task = synthetic_task(n=320, noise=2.5)
    m = create_method("jeidnn", {"lambdas": [0.1], "epochs": 4, "warmup_patience": 0}).fit(task)
    assert m.warmup_epochs_run_ == 0 and m.joint_epochs_run_ == 4 and len(m.warmup_lrs_) == 0
