"""``ztw`` (Zero Time Waste) against outputs of the authors' code (gmum/Zero-Time-Waste ``ztw_cv`` at 8341f3a:
``ZTWCascading`` with ``vit_cascading_head``, ``ZTWEnsembling`` with ``GeometricWeightedEnsemble``, the training
loss of ``methods/early_exit.py`` and the exit loop of ``eval.py``) on fixed inputs and weights:
``tests/data/ztw_official.npz``, described in the .md beside it. Floats must agree to float32 rounding
(rtol 1e-5), exits exactly. Then the method's own properties: stream equals decide, training lowers the loss,
the cost accounting of the method card, and the conformance suite."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.conformance import default_task, run_checks
from bench.core.interface import OperatingPoint, create_method, resolve_points, stream_exits
from bench.core.task import synthetic_task
from methods.ztw import Cascade, ZeroTimeWaste, cascading_head, geometric_ensemble, init_cascade, ztw_loss

CASES_FILE = Path(__file__).parent / "data" / "ztw_official.npz"
RTOL, ATOL = 1e-5, 1e-6


def _load() -> list[dict[str, np.ndarray]]:
    with np.load(CASES_FILE, allow_pickle=False) as z:
        n = int(z["num_cases"])
        return [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"case{i}_")} for i in range(n)]


CASES = _load()
CASE_IDS = list(range(len(CASES)))


def _close(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=RTOL, atol=ATOL, err_msg=what)


def _cascade(c: dict, requires_grad: bool = False) -> Cascade:
    k_heads = int(c["shape"][0]) - 1
    t = lambda a: torch.tensor(a).requires_grad_(requires_grad)  # noqa: E731
    ln = bool(c["layer_norm"])
    num_classes = int(c["shape"][3])
    ln_w = t(np.stack([c[f"head{i}_ln_weight"] for i in range(k_heads)])) if ln else None
    ln_b = t(np.stack([c[f"head{i}_ln_bias"] for i in range(k_heads)])) if ln else None
    assert num_classes == c["head0_bias"].shape[0]
    return Cascade([t(c[f"head{i}_weight"]) for i in range(k_heads)],
                   t(np.stack([c[f"head{i}_bias"] for i in range(k_heads)])), ln_w, ln_b, bool(c["detach"]))


def _method(c: dict) -> ZeroTimeWaste:
    """The method with the case's weights as its fitted state."""
    k = int(c["shape"][0])
    m = ZeroTimeWaste(layer_norm=bool(c["layer_norm"]), detach=bool(c["detach"]))
    m.cascade_ = _cascade(c)
    m.ens_weight_ = [torch.tensor(c[f"ens{i}_weight"]) for i in range(k - 1)]
    m.ens_bias_ = torch.tensor(np.stack([c[f"ens{i}_bias"] for i in range(k - 1)]))
    m.head_weight_, m.head_bias_ = torch.tensor(c["final_weight"]), torch.tensor(c["final_bias"])
    m.costs_ = np.arange(1, k + 1) * 1000
    return m


def _split(c: dict):
    from bench.core.task import SplitData
    feats = torch.tensor(c["features"])
    return SplitData(feats, c["targets"].astype(np.int64), np.arange(feats.shape[1]))


def test_the_cases_file_covers_the_options():
    assert len(CASES) >= 3
    assert {(bool(c["layer_norm"]), bool(c["detach"])) for c in CASES} >= {(True, True), (True, False),
                                                                           (False, True)}
    assert len({tuple(c["shape"]) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("i", CASE_IDS)
def test_cascading_heads_equal_the_official_forward(i):
    c = CASES[i]
    heads = _cascade(c).forward(torch.tensor(c["features"]))
    assert len(heads) == c["out_heads"].shape[0]
    for k, z in enumerate(heads):
        _close(z, c["out_heads"][k], f"head {k}")


@pytest.mark.parametrize("i", CASE_IDS)
def test_exit_logits_equal_the_official_ensembles_and_backbone_head(i):
    c = CASES[i]
    logits = _method(c).exit_logits(_split(c))
    _close(logits[:-1], c["out_ens"], "geometric ensembles")
    _close(logits[-1], c["out_final"], "the backbone's head (the last exit, not ensembled)")
    # the ensemble in isolation: mean_i(exp(w_i) log_softmax(z_i)) + b on the official heads' outputs
    logp = torch.log_softmax(torch.tensor(c["out_heads"]), -1).permute(1, 0, 2)
    for k in range(logp.shape[1]):
        _close(geometric_ensemble(logp[:, :k + 1], torch.tensor(c[f"ens{k}_weight"]),
                                  torch.tensor(c[f"ens{k}_bias"])), c["out_ens"][k], f"ensemble {k}")


@pytest.mark.parametrize("i", CASE_IDS)
def test_losses_and_gradients_equal_the_official_training_step(i):
    """Stage 1's loss and every head parameter's gradient (detach or not), stage 2's loss and every ensemble
    parameter's gradient with the heads frozen."""
    c = CASES[i]
    y, final = torch.tensor(c["targets"]).long(), torch.tensor(c["out_final"])
    cas = _cascade(c, requires_grad=True)
    loss = ztw_loss(cas.forward(torch.tensor(c["features"])), final, y)
    loss.backward()
    _close(loss, c["out_loss_heads"], "stage-1 loss")
    for k in range(len(cas.weight)):
        _close(cas.weight[k].grad, c[f"grad_head{k}_weight"], f"grad of head {k}'s weight")
        _close(cas.bias.grad[k], c[f"grad_head{k}_bias"], f"grad of head {k}'s bias")
        if cas.ln_weight is not None and k > 0:
            _close(cas.ln_weight.grad[k], c[f"grad_head{k}_ln_weight"], f"grad of head {k}'s LayerNorm weight")
            _close(cas.ln_bias.grad[k], c[f"grad_head{k}_ln_bias"], f"grad of head {k}'s LayerNorm bias")
    logp = torch.log_softmax(torch.tensor(c["out_heads"]), -1).permute(1, 0, 2)
    ws = [torch.tensor(c[f"ens{k}_weight"], requires_grad=True) for k in range(logp.shape[1])]
    bs = [torch.tensor(c[f"ens{k}_bias"], requires_grad=True) for k in range(logp.shape[1])]
    loss = ztw_loss([geometric_ensemble(logp[:, :k + 1], ws[k], bs[k]) for k in range(len(ws))], final, y)
    loss.backward()
    _close(loss, c["out_loss_ens"], "stage-2 loss")
    for k in range(len(ws)):
        _close(ws[k].grad, c[f"grad_ens{k}_weight"], f"grad of ensemble {k}'s weights")
        _close(bs[k].grad, c[f"grad_ens{k}_bias"], f"grad of ensemble {k}'s bias")


@pytest.mark.parametrize("i", CASE_IDS)
def test_exits_equal_the_official_threshold_rule_decided_and_streamed(i):
    c = CASES[i]
    m, split = _method(c), _split(c)
    logits = m.exit_logits(split)
    for t, want in zip(c["thresholds"], c["out_exits"]):
        point = OperatingPoint({"threshold": float(t)}, 0.5)
        got = m.decide(logits, point)
        np.testing.assert_array_equal(got, want, err_msg=f"threshold {t}")
        streamed, left_with = stream_exits(m, split.features, point)
        np.testing.assert_array_equal(streamed, want, err_msg=f"streamed, threshold {t}")
        torch.testing.assert_close(left_with, logits[torch.from_numpy(want), torch.arange(len(want))])


def test_head_shapes_and_init_follow_the_authors():
    gen = torch.Generator().manual_seed(0)
    c = CASES[0]
    cas = init_cascade(len(c["out_heads"]), c["features"].shape[2], c["out_heads"].shape[2], gen)
    assert [tuple(w.shape) for w in cas.weight] == [c[f"head{k}_weight"].shape for k in range(len(cas.weight))]
    fan_in = cas.weight[1].shape[1]  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both
    assert cas.weight[1].abs().max() <= fan_in ** -0.5 and cas.bias[1].abs().max() <= fan_in ** -0.5
    assert torch.equal(cas.ln_weight, torch.ones_like(cas.ln_weight)) and not cas.ln_bias.any()
    x, prev = torch.randn(3, cas.weight[1].shape[1] - cas.bias.shape[1]), torch.randn(3, cas.bias.shape[1])
    with pytest.raises(RuntimeError):  # head 0 takes no cascading input: its weight has D columns only
        cascading_head(x, prev, cas.weight[0], cas.bias[0])


# ---- the fitted method -----------------------------------------------------------------------------------------
FAST = {"epochs": 8, "ensemble_epochs": 15}


@pytest.fixture(scope="module")
def fitted():
    task = synthetic_task(noise=3.0, n=300)
    return task, create_method("ztw", FAST).fit(task)


def test_training_lowers_both_stages_losses(fitted):
    task, m = fitted
    hist = m.loss_history_
    assert len(hist["heads"]) == FAST["epochs"] and len(hist["ensembles"]) == FAST["ensemble_epochs"]
    assert hist["heads"][-1] < 0.8 * hist["heads"][0]
    assert hist["ensembles"][-1] < hist["ensembles"][0]
    # independently of the log: the authors' loss on train is lower with the fitted heads than at init
    train = task.splits["train"]
    y, final = torch.from_numpy(train.labels), task.final_logits(train)
    init = init_cascade(task.num_exits - 1, task.dim, task.num_classes, torch.Generator().manual_seed(task.seed))
    with torch.no_grad():
        assert ztw_loss(m.cascade_.forward(train.features), final, y) < ztw_loss(init.forward(train.features),
                                                                                  final, y)
    assert 1 <= m.head_epoch_ <= FAST["epochs"] and np.isfinite(m.ens_val_ce_).all()


def test_stream_equals_decide_with_state_carried(fitted):
    task, m = fitted
    test = task.splits["test"]
    points = [p for p in resolve_points(m, task, [0.3, 0.5, 0.7, 0.9]) if not p.infeasible]
    assert points
    for p in points:
        logits = m.exit_logits(test, p)
        exits = m.decide(logits, p)
        got, left_with = stream_exits(m, test.features, p)
        np.testing.assert_array_equal(got, exits)
        torch.testing.assert_close(left_with, logits[torch.from_numpy(exits), torch.arange(len(exits))])
    _, _, state = m.stream(1, test.features[1, :7], points[0], m.stream(0, test.features[0, :7], points[0], None)[2])
    assert state["prev"].shape == (7, task.num_classes) and state["logp"].shape == (7, 2, task.num_classes)


def test_costs_count_heads_cascade_ensembles_and_decisions(fitted):
    task, m = fitted
    d, c, k = task.dim, task.num_classes, task.num_exits
    extra = [d * c + (c * c + 5 * c if i else 0) + 2 * c + (i + 2) * c + 2 * c for i in range(k - 1)]
    np.testing.assert_array_equal(m.costs_, task.exit_costs(np.array(extra)))
    assert m.costs_[-1] > task.macs.static
    no_ln = ZeroTimeWaste(layer_norm=False).extra_macs(d, c, k)
    np.testing.assert_array_equal(no_ln, np.array(extra) - np.array([0] + [5 * c] * (k - 2)))


@dataclass(frozen=True)
class _FastZTW:  # hashable: the conformance suite fits it once for the checks that only read it
    def __call__(self):
        return create_method("ztw", FAST)


def test_the_conformance_suite_passes():
    results = run_checks(_FastZTW(), default_task())
    assert all(r.status == "PASS" for r in results), [(r.name, r.message) for r in results if r.status != "PASS"]
