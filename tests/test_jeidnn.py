"""JEI-DNN (``jeidnn``, the official method, and ``jeidnn_consistent``): the pieces checked against hand-computed
values, then each fitted variant's exit contract. The official schedule is tested in test_jeidnn_official.py."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.core.conformance import scramble_after_exit
from bench.base.errors import UserError
from bench.core.interface import OperatingPoint, create_method, resolve_points, stream_exits
from bench.core.task import synthetic_task
from methods._jeidnn_parts import (
    conditional_exit_probabilities,
    conditional_targets,
    cumulative_exit_probabilities,
    exit_probabilities,
    first_at_least,
    gate_features,
    gate_targets,
    inference_exits,
    oracle_exits,
    positive_weights,
    weighted_im_loss,
)
from methods.jeidnn_consistent import fit_gates

VARIANTS = ("jeidnn", "jeidnn_consistent")

FAST = {"lambdas": [0.05, 0.2, 1.0], "epochs": 4}  # enough to exercise every code path in well under a second


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The training runs thousands of tiny ops: one thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=VARIANTS)
def fitted(task, request):
    return create_method(request.param).fit(task)


@pytest.fixture(scope="module")
def hard_task():
    """Noisier exits than the default synthetic task: here the lambdas give distinct operating points."""
    return synthetic_task(n=2000, noise=2.5)


@pytest.fixture(scope="module")
def hard_fits(hard_task):
    """Each variant fitted once on the hard task, shared by the tests that need it."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = create_method(name).fit(hard_task)
        return cache[name]
    return get


@pytest.fixture(scope="module", params=VARIANTS)
def hard(hard_fits, request):
    return hard_fits(request.param)


# -- the pieces, by hand ---------------------------------------------------------------------------------------

def test_gate_features_by_hand():
    # z = (0, 1, 2): p = (1, e, e^2) / (1 + e + e^2); softmax(2z) = (1, e^2, e^4) / (1 + e^2 + e^4)
    f = gate_features(torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64))[0]
    p = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219]
    assert f[0].item() == pytest.approx(p[2], abs=1e-12)  # p_max
    assert f[1].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)  # H(p)
    assert f[1].item() == pytest.approx(0.8323955818, abs=1e-9)
    assert f[2].item() == pytest.approx(0.4205124847, abs=1e-9)  # p(1) - p(2)
    q = [1 / (1 + math.e ** 2 + math.e ** 4), math.e ** 2 / (1 + math.e ** 2 + math.e ** 4)]
    q.append(1 - sum(q))
    assert f[3].item() == pytest.approx(-sum(v * math.log(v) for v in q), abs=1e-12)  # H(softmax(2z))
    assert f[3].item() == pytest.approx(0.4410574441, abs=1e-9)
    # a tied maximum has margin 0; uniform logits: p_max = 1/C, both entropies = log C
    tie = gate_features(torch.tensor([[3.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    assert tie[0, 2].item() == 0.0
    assert tie[1].tolist() == pytest.approx([1 / 3, math.log(3), 0.0, math.log(3)], abs=1e-6)
    # detached, and batch-shaped: [..., C] -> [..., 4]
    z = torch.randn(2, 5, 7, requires_grad=True)
    out = gate_features(z)
    assert out.shape == (2, 5, 4) and not out.requires_grad


def test_exit_probabilities_and_inference_by_hand():
    # columns are samples; rows gates 0..2 (K = 4 exits)
    g = np.array([[0.3, 0.7, 0.1, 0.25],
                  [0.5, 0.6, 0.2, 0.375],
                  [0.4, 0.5, 0.1, 0.5]])
    p = exit_probabilities(g)
    expected = np.array([[0.3, 0.7, 0.1, 0.25],
                         [0.5, 0.3, 0.2, 0.375],  # sample 1: min(0.6, 1 - 0.7) = 0.3
                         [0.2, 0.0, 0.1, 0.375],  # sample 0: min(0.4, 1 - 0.8); sample 1: 1 - 1.3 < 0 -> 0
                         [0.0, 0.0, 0.6, 0.0]])
    np.testing.assert_allclose(p, expected, atol=1e-12)
    np.testing.assert_allclose(p.sum(0), 1.0)
    assert torch.allclose(exit_probabilities(torch.tensor(g)), torch.tensor(expected), atol=1e-12)
    # sample 0: 0.3 < 0.5, 0.5 >= 0.5 * 0.7 -> 1; sample 1: 0.7 >= 0.5 -> 0; sample 2: never -> 3;
    # sample 3 (exact binary fractions): 0.25 < 0.5, 0.375 >= 0.5 * (1 - 0.25) = 0.375 -> 1 (>= is inclusive)
    np.testing.assert_array_equal(inference_exits(g), [1, 0, 3, 1])
    # leading dims: [L, K-1, N]
    assert exit_probabilities(torch.tensor(np.stack([g, g]))).shape == (2, 4, 4)


def test_oracle_targets_and_positive_weights_by_hand():
    costs_rel = np.array([0.25, 0.5, 1.0])  # lambda 0.5 adds (0.125, 0.25, 0.5)
    ce = np.array([[0.125, 1.0, 1.0, 0.375],
                   [0.125, 0.5, 0.25, 0.25],
                   [0.0, 0.125, 0.25, 0.0]])
    # e = (0.25, 0.375, 0.5) | (1.125, 0.75, 0.625) | (1.125, 0.5, 0.75) | (0.5, 0.5, 0.5): a tie takes the first
    oracle = oracle_exits(ce, costs_rel, 0.5)
    np.testing.assert_array_equal(oracle, [0, 2, 1, 0])
    np.testing.assert_array_equal(oracle_exits(ce, costs_rel, 0.0), [2, 2, 1, 2])  # no cost: lowest CE
    np.testing.assert_array_equal(gate_targets(oracle, 3), [[1, 0, 0, 1], [1, 0, 1, 1]])
    # n = (2, 1) of N = 4: (4 - 2) / 2 = 1, (4 - 1) / 1 = 3
    np.testing.assert_allclose(positive_weights(oracle, 3), [1.0, 3.0])
    # n_1 = 0 -> floored at 0.1 -> 39, capped at 5; everyone at exit 0 -> weight 0 (the formula's edge case)
    np.testing.assert_allclose(positive_weights(np.array([0, 0, 2, 2]), 3), [1.0, 5.0])
    np.testing.assert_allclose(positive_weights(np.array([0, 0, 0, 0]), 3), [0.0, 5.0])
    # the official code's cumulative variant counts gate l's positives (l* <= l): (2, 3) -> (1, 1/3)
    np.testing.assert_allclose(positive_weights(oracle, 3, cumulative=True), [1.0, 1 / 3])
    # torch in, torch out, with leading dims (one row per lambda)
    o = oracle_exits(torch.tensor(np.stack([ce, ce])), costs_rel, torch.tensor([0.5, 0.0])[:, None, None])
    assert o.tolist() == [[0, 2, 1, 0], [2, 2, 1, 2]]


def test_im_loss_detached_reweights_gradient_official_is_plain_ce():
    """Same value as mean_n sum_l CE_l in both modes; only the detached ratio lets P shape the gradient."""
    gen = torch.Generator().manual_seed(0)
    logits0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)  # [K-1 = 2, N = 3, C = 4]
    y = torch.tensor([0, 2, 3])
    p = torch.tensor([[0.8, 0.1, 0.0], [0.2, 0.3, 0.0]], dtype=torch.float64)  # sample 2: all mass on the last exit

    def run(mode):
        z = logits0.clone().requires_grad_(True)
        ce = F.cross_entropy(z.reshape(-1, 4), y.repeat(2), reduction="none").reshape(2, 3)
        loss = ce.sum(0).mean() if mode == "plain" else weighted_im_loss(ce, p, mode)
        loss.backward()
        return loss.detach(), z.grad, ce.detach()

    plain, g_plain, ce = run("plain")
    det, g_det, _ = run("detached")
    off, g_off, _ = run("official")
    assert det.item() == pytest.approx(plain.item(), rel=1e-12)
    assert off.item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.allclose(g_off, g_plain, atol=1e-12)
    assert not torch.allclose(g_det, g_plain, atol=1e-3)
    # detached by hand: d loss / d CE_ln = P_ln * r_n / N, r_n = sum_l CE_ln / sum_l P_ln CE_ln; P = 0 -> weight 1
    r = ce.sum(0) / (p * ce).sum(0)
    w = torch.where(torch.arange(3) == 2, torch.ones_like(p), p * r) / 3
    ce_leaf = ce.clone().requires_grad_(True)
    weighted_im_loss(ce_leaf, p, "detached").backward()
    assert torch.allclose(ce_leaf.grad, w, atol=1e-12)
    with pytest.raises(ValueError, match="detached"):
        weighted_im_loss(ce, p, "bogus")
    # probability: (K-1) sum_l P_l CE_l, weights independent of the CEs; mean over exits divides by K-1
    ce_leaf = ce.clone().requires_grad_(True)
    prob = weighted_im_loss(ce_leaf, p, "probability")
    prob.backward()
    assert prob.item() == pytest.approx(float((2 * (p * ce).sum(0)).mean()), rel=1e-12)
    assert torch.allclose(ce_leaf.grad, 2 * p / 3, atol=1e-12)
    assert weighted_im_loss(ce, p, "probability", "mean").item() == pytest.approx(prob.item() / 2, rel=1e-12)


# -- the fitted method -----------------------------------------------------------------------------------------

def test_costs_count_heads_and_gates(task, fitted):
    k, d, c = task.num_exits, task.dim, task.num_classes
    per_exit = d * c + 9 * c + 6
    blocks = task.macs.cumulative_blocks()
    np.testing.assert_array_equal(fitted.costs_[:-1], blocks[:-1] + per_exit * np.arange(1, k))
    assert fitted.costs_[-1] == task.macs.static + (k - 1) * per_exit


def test_exit_logits_per_lambda_and_warmup(task, hard_task, hard):
    split = hard_task.splits["test"]
    warm = hard.exit_logits(split)
    assert torch.allclose(warm[-1], hard_task.final_logits(split))
    points = hard.operating_points(hard_task, [])
    per_point = [hard.exit_logits(split, p) for p in points]
    assert all(torch.equal(lg[-1], warm[-1]) for lg in per_point)
    # the consistent variant trains the IMs further per lambda; the official one cannot here: an epoch of 32
    # mini-batches (< 200) has gate phases only (the official per-epoch phase counter)
    assert torch.equal(per_point[0][0], warm[0]) == (hard.name == "jeidnn")
    for k in range(hard_task.num_exits):  # the runner's per-exit call gives the same logits
        assert torch.equal(hard.exit_head(k, split.features[k], points[2]), per_point[2][k])
    with pytest.raises(ValueError, match="not in the fitted grid"):
        hard.exit_logits(split, OperatingPoint({"lambda": 0.123}, 0.5))


def test_streaming_equals_decide_and_is_causal(hard_task, hard):
    split = hard_task.splits["test"]
    seen = set()
    for p in hard.operating_points(hard_task, []):
        logits = hard.exit_logits(split, p)
        exits = hard.decide(logits, p)
        seen |= set(exits.tolist())
        assert np.array_equal(stream_exits(hard, split.features, p)[0], exits)
        assert np.array_equal(hard.decide(scramble_after_exit(logits, exits), p), exits)
    assert len(seen) >= 2  # the check is not vacuous


def test_budgets_respected_on_val_and_cost_falls_with_lambda(hard_task, hard):
    static = hard_task.macs.static
    val = hard_task.splits["val"]
    budgets = [0.1, 0.28, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0]
    resolved = resolve_points(hard, hard_task, budgets)
    points = resolved[:len(budgets)]
    assert points[0].infeasible  # even exit 0 costs more than 0.1
    prev = -1.0
    for b, p in zip(budgets, points):
        if p.infeasible:
            continue
        cost = (hard.costs_[hard.decide(hard.exit_logits(val, p), p)] / static).mean()
        assert cost <= b + 1e-9 and cost == pytest.approx(p.val_macs_rel)
        assert cost >= prev
        prev = cost
    native = resolved[len(budgets):]
    assert [p.params["lambda"] for p in native] == list(hard.lambdas_)
    cost = np.array([p.val_macs_rel for p in native])
    lam_rank, cost_rank = np.argsort(np.argsort(hard.lambdas_)), np.argsort(np.argsort(cost))
    spearman = np.corrcoef(lam_rank, cost_rank)[0, 1]
    assert cost[0] > cost[-1] + 0.05 and spearman <= -0.7, (cost, spearman)


def test_fit_is_deterministic_label_blind_and_pickles(task, fitted):
    again = create_method(fitted.name).fit(task)
    for name in ("warm_w_", "warm_b_", "im_w_", "im_b_", "gate_w_", "gate_b_"):
        assert torch.equal(getattr(again, name), getattr(fitted, name)), name
    test = task.splits["test"]
    p = resolve_points(fitted, task, [0.6])[0]
    exits = fitted.decide(fitted.exit_logits(test, p), p)
    assert np.array_equal(again.decide(again.exit_logits(test.without_labels(), p), p), exits)
    clone = pickle.loads(pickle.dumps(fitted))
    assert np.array_equal(clone.decide(clone.exit_logits(test, p), p), exits)


def test_close_to_threshold_on_synthetic(task, fitted):
    thr = create_method("threshold").fit(task)
    test = task.splits["test"]

    def accuracy(method, point, logits):
        exits = method.decide(logits, point)
        return (logits[exits, np.arange(len(test))].argmax(1).numpy() == test.labels).mean()

    pj, pt = resolve_points(fitted, task, [0.75])[0], resolve_points(thr, task, [0.75])[0]
    acc_j = accuracy(fitted, pj, fitted.exit_logits(test, pj))
    acc_t = accuracy(thr, pt, thr.exit_logits(test))
    assert acc_j >= acc_t - 0.05, (acc_j, acc_t)


def test_im_loss_modes_and_shared_heads(hard_task):
    cfg = {**FAST, "epochs": 10, "alternate_every": 5}  # IM phases happen (num_epoch includes the warm-up)
    det = create_method("jeidnn", {**cfg, "im_loss": "detached"}).fit(hard_task)
    off = create_method("jeidnn", cfg).fit(hard_task)  # official: the default
    shared = create_method("jeidnn", {**cfg, "share_heads": True}).fit(hard_task)
    assert torch.equal(det.warm_w_, off.warm_w_)  # one warm-up for every variant
    assert not torch.allclose(det.im_w_, off.im_w_)  # the detached weights change what the IMs learn
    for j in range(len(FAST["lambdas"])):
        assert torch.equal(shared.im_w_[j], shared.warm_w_) and torch.equal(shared.im_b_[j], shared.warm_b_)
    assert not torch.equal(shared.gate_w_, det.gate_w_)


def test_bad_fields_and_unfitted(task):
    with pytest.raises(UserError, match="im_loss"):
        create_method("jeidnn", {"im_loss": "weighted"})
    with pytest.raises(UserError, match="lambdas"):
        create_method("jeidnn", {"lambdas": []})
    with pytest.raises(UserError, match="distinct"):
        create_method("jeidnn", {"lambdas": [0.1, 0.1]})
    with pytest.raises(UserError, match="call fit"):
        create_method("jeidnn").operating_points(task, [0.5])


# -- the consistent variant ---------------------------------------------------------------------------------------

def test_consistent_readings_of_the_gate_by_hand():
    g = np.array([[0.5, 0.3, 0.6], [0.5, 0.2, 0.1], [0.4, 0.6, 0.9]])  # [K-1 = 3, N = 3]
    p = conditional_exit_probabilities(torch.tensor(g)).numpy()
    # sample 0: 0.5, 0.5 * 0.5, 0.4 * 0.25, rest 0.15
    np.testing.assert_allclose(p[:, 0], [0.5, 0.25, 0.1, 0.15], atol=1e-12)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-12)
    q = cumulative_exit_probabilities(torch.tensor(g)).numpy()
    # sample 1: F = running max (0.3, 0.3, 0.6) -> P = (0.3, 0, 0.3, 0.4); sample 2: F = (0.6, 0.6, 0.9)
    np.testing.assert_allclose(q[:, 1], [0.3, 0.0, 0.3, 0.4], atol=1e-12)
    np.testing.assert_allclose(q[:, 2], [0.6, 0.0, 0.3, 0.1], atol=1e-12)
    # first g_l >= 0.5 (inclusive); sample 1 leaves at gate 2; none -> the last exit
    np.testing.assert_array_equal(first_at_least(g), [0, 2, 0])
    np.testing.assert_array_equal(first_at_least(np.array([[0.1], [0.49]])), [2])
    # conditional targets: gate l sees the samples still running at l (oracle >= l), target 1 where oracle == l
    t, m = conditional_targets(torch.tensor([0, 1, 2]), 3)
    assert t.tolist() == [[1, 0, 0], [0, 1, 0]] and m.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_fit_gates_recovers_a_known_logistic_model_and_ignores_masked_samples():
    gen = torch.Generator().manual_seed(0)
    n = 40000
    f = torch.randn(2, n, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([0.5, 1.0, 0.0, 2.0])
    w_true = torch.tensor([[1.0, -0.5, 2.0, 0.25], [-1.0, 0.0, 0.5, 0.5]])
    b_true = torch.tensor([0.3, -1.0])
    y = (torch.rand(2, n, generator=gen) < torch.sigmoid((f * w_true[:, None]).sum(-1) + b_true[:, None])).float()
    mask = torch.ones(2, n)
    w, b, grad = fit_gates(f, y, mask, torch.ones(2), l2=0.0, max_iter=200)
    assert grad < 1e-5
    assert torch.allclose(w, w_true, atol=0.06) and torch.allclose(b, b_true, atol=0.08)
    # samples outside the mask do not count, whatever their targets
    extra_f, extra_y = torch.cat([f, f[:, :5000] * 3], 1), torch.cat([y, 1 - y[:, :5000]], 1)
    extra_m = torch.cat([mask, torch.zeros(2, 5000)], 1)
    w2, b2, _ = fit_gates(extra_f, extra_y, extra_m, torch.ones(2), l2=0.0, max_iter=200)
    assert torch.allclose(w2, w, atol=1e-3) and torch.allclose(b2, b, atol=1e-3)


def test_consistent_reaches_the_backbone_and_its_curve_is_not_capped(hard_task, hard_fits):
    m = hard_fits("jeidnn_consistent")
    test = hard_task.splits["test"]
    static = (hard_task.final_logits(test).argmax(1).numpy() == test.labels).mean()
    native = resolve_points(m, hard_task, [])
    costs = [p.val_macs_rel for p in native]
    p = native[int(np.argmax(costs))]
    logits = m.exit_logits(test, p)
    exits = m.decide(logits, p)
    acc = (logits[exits, np.arange(len(test))].argmax(1).numpy() == test.labels).mean()
    assert max(costs) > 0.6 and acc >= static - 0.005, (costs, acc, static)
    assert (m.gate_grad_max_ < 1e-2).all()  # the gates are fitted, not left near their prior


def test_consistent_threshold_option_meets_budgets(hard_task):
    m = create_method("jeidnn_consistent", {**FAST, "exit_rule": "threshold"}).fit(hard_task)
    budgets = [0.4, 0.6, 0.8]
    points = resolve_points(m, hard_task, budgets)[:3]
    val = hard_task.splits["val"]
    for b, p in zip(budgets, points):
        assert p.params["lambda"] == 0.05 and "threshold" in p.params  # the smallest lambda of the grid
        cost = (m.costs_[m.decide(m.exit_logits(val, p), p)] / hard_task.macs.static).mean()
        assert cost <= b + 1e-9 and cost > b - 0.05
        assert np.array_equal(stream_exits(m, val.features, p)[0], m.decide(m.exit_logits(val, p), p))
