"""JEI-DNN's pure pieces against outputs of the authors' code (github.com/networkslab/dynn, HEAD 8dd598d) on fixed
inputs: ``tests/data/jeidnn_official_cases.npz`` (a copy of ``../shared/reference/``; its format is in the .md
beside it), or the file named by ``$JEIDNN_OFFICIAL_CASES``. Integers must match exactly, floats within 1e-5
relative; the test fails when the file is missing or holds no case.

Known differences, asserted rather than skipped: the project's official-mode IM loss sums over the G gated exits
where the official code averages (G times larger), and where the official loss is NaN (a sample with
sum_l P_l CE_l = 0) the project falls back to plain CE. The official warm-up loss includes the frozen final
head's CE; the project's warm-up trains the IMs only, so it leaves that constant term out.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.jeidnn import (exit_probabilities, gate_features, gate_targets, inference_exits, oracle_exits,
                            positive_weights, weighted_im_loss)

CASES = Path(os.environ.get("JEIDNN_OFFICIAL_CASES", Path(__file__).parent / "data" / "jeidnn_official_cases.npz"))
RTOL, ATOL = 1e-5, 1e-6


def load_cases() -> list[dict[str, np.ndarray]]:
    assert CASES.is_file(), f"official JEI-DNN cases not found at {CASES} (set JEIDNN_OFFICIAL_CASES)"
    with np.load(CASES, allow_pickle=False) as z:
        n = int(z["num_cases"])
        cases = [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"case{i}_")} for i in range(n)]
    assert cases and all(cases), f"{CASES} holds no case"
    return cases


CASE_LIST = load_cases() if CASES.is_file() else []


def test_the_cases_file_is_there_and_not_empty():
    cases = load_cases()
    assert len(cases) >= 1
    shapes = {(c["im_logits"].shape[0] + 1, c["im_logits"].shape[2]) for c in cases}  # (K, C)
    assert len(shapes) > 1  # several exit counts and class counts


def _ce(logits: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Per-sample CE [..., N] in float64."""
    return F.cross_entropy(torch.as_tensor(logits, dtype=torch.float64).flatten(0, -2),
                           torch.as_tensor(y).repeat(int(np.prod(logits.shape[:-2])) if logits.ndim > 2 else 1),
                           reduction="none").reshape(logits.shape[:-1])


@pytest.mark.parametrize("i", range(len(CASE_LIST)))
def test_gate_pieces_match_the_official_code(i):
    c = CASE_LIST[i]
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
    assert np.array_equal(inference_exits(g.numpy()), c["out_exit"])


@pytest.mark.parametrize("i", range(len(CASE_LIST)))
def test_oracle_targets_and_positive_weights_match_the_official_code(i):
    c = CASE_LIST[i]
    k = c["im_logits"].shape[0] + 1
    ce = torch.cat([_ce(c["im_logits"], c["targets"]), _ce(c["final_logits"][None], c["targets"])]).numpy()
    costs = np.concatenate([c["im_costs"], [1.0]])  # the official last exit costs exactly 1
    oracle = oracle_exits(ce, costs, float(c["lam"]))
    assert np.array_equal(oracle, c["out_oracle"])
    assert np.array_equal(gate_targets(oracle, k).astype(np.int64), c["out_gate_targets"])
    counts = np.bincount(oracle, minlength=k)[:-1]
    assert np.array_equal(counts, c["out_oracle_counts"])
    np.testing.assert_allclose(positive_weights(oracle, k, cap=5.0), c["out_pos_weights"], rtol=RTOL)


@pytest.mark.xfail(strict=True, reason="the official gate-phase loss value (out_gate_loss_pos_weight_1) is not "
                                       "reproduced yet: BCE with logits averaged over gates and samples, as the "
                                       "project trains, differs from it (the official method is issue 11)")
@pytest.mark.parametrize("i", range(len(CASE_LIST)))
def test_gate_phase_loss_matches_the_official_code(i):
    c = CASE_LIST[i]
    bce = F.binary_cross_entropy_with_logits(torch.as_tensor(c["out_gate_logits"], dtype=torch.float64),
                                             torch.as_tensor(c["out_gate_targets"], dtype=torch.float64))
    assert float(bce) == pytest.approx(float(c["out_gate_loss_pos_weight_1"]), rel=RTOL)


@pytest.mark.parametrize("i", range(len(CASE_LIST)))
def test_im_and_warmup_losses_match_the_official_code(i):
    c = CASE_LIST[i]
    g_count = c["im_logits"].shape[0]
    ce = _ce(c["im_logits"], c["targets"])  # [G, N]
    p = torch.as_tensor(c["out_exit_prob"], dtype=torch.float64)
    ours = float(weighted_im_loss(ce, p, "official"))
    official = float(c["out_im_loss"])
    # official mode: the attached ratio cancels the weights, so the loss is plain CE summed over the exits
    assert ours == pytest.approx(float(ce.sum(0).mean()), rel=RTOL)
    if np.isnan(official):  # 0/0 in the official code; here those samples fall back to plain CE
        assert ((p * ce).sum(0) == 0).any() and np.isfinite(ours)
    else:
        assert ours / g_count == pytest.approx(official, rel=RTOL)  # the official code averages over the exits
    k = g_count + 1
    weights = torch.arange(k, 1, -1, dtype=torch.float64)  # K, K-1, ..., 2 for IMs 0..K-2
    warm = float((weights * ce.mean(-1)).sum() + _ce(c["final_logits"][None], c["targets"]).mean())
    assert warm == pytest.approx(float(c["out_warmup_loss"]), rel=RTOL)
