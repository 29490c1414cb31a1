"""``laplace`` (Meronen et al., WACV 2024) against outputs of the authors' code, and as a method of the harness.

``tests/data/laplace_official.npz`` holds, for fixed features, heads, labels and seeds, what the authors'
functions (github.com/AaltoML/calibrated-dnn @ da011d2: ``laplace.get_hessian_efficient`` with BackPACK 1.5.0's
KFAC and KFLR, ``estimate_variance_efficient``, ``adaptive_inference.Tester.calc_la_logit``,
``calc_ensemble_logits`` and the grid search of ``dynamic_evaluate``) return; how it was made is in the .md
beside it. Floats must agree to float32 rounding, the tuned grid values exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import methods.laplace  # noqa: F401  (registers ``laplace``)
from bench.core.conformance import run_checks
from bench.core.interface import create_method, resolve_points, stream_exits
from bench.core.task import synthetic_task
from bench.measure.metrics import ece, nll
from methods.laplace import (TEMPERATURE_GRID, VAR0_GRID, ema_coefficients, kron_factors, laplace_probs,
                             mie_combine, posterior, tune)

CASES = Path(__file__).parent / "data" / "laplace_official.npz"
RTOL = 2e-6  # float32 rounding, relative to the largest entry of the array compared


def _cases() -> list[dict[str, np.ndarray]]:
    with np.load(CASES, allow_pickle=False) as z:
        n = int(z["num_cases"])
        return [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"case{i}_")} for i in range(n)]


OFFICIAL = _cases()
IDS = [f"case{i}" for i in range(len(OFFICIAL))]


def close(got, want, rtol=RTOL):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rtol, f"max error {err:.3g} relative to the largest entry (allowed {rtol:g})"


def _aug_weight(c):
    return torch.cat([torch.as_tensor(c["weight"]), torch.as_tensor(c["bias"])[..., None]], dim=2)


def test_the_cases_cover_several_shapes_and_the_capped_running_average():
    assert len(OFFICIAL) >= 2
    assert len({c["weight"].shape for c in OFFICIAL}) == len(OFFICIAL)
    assert max(math.ceil(len(c["train_labels"]) / 64) for c in OFFICIAL) > 20  # rho reaches its 0.95 cap
    assert all(len(c["train_labels"]) % 64 for c in OFFICIAL)  # a smaller last batch


def test_ema_coefficients_are_the_running_average():
    for n in (1, 5, 20, 23, 60):
        u = np.zeros(n)
        for i in range(n):  # the authors' update, on one-hot "factors"
            rho = min(1 - 1 / (i + 1), 0.95)
            u = rho * u + (1 - rho) * np.eye(n)[i]
        np.testing.assert_allclose(ema_coefficients(n), u, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("hessian", ["kfac", "kflr"])
@pytest.mark.parametrize("i", range(len(OFFICIAL)), ids=IDS)
def test_kronecker_factors_match_the_official_code(i, hessian):
    c = OFFICIAL[i]
    w = _aug_weight(c)
    gen = torch.Generator().manual_seed(int(c["hessian_seed"]))
    # the official function first makes one nn.Linear(D+1, C) per exit from the global generator (their weights
    # are then overwritten): the same draws here, so the class samples of KFAC come from the same state
    for _ in range(w.shape[0]):
        torch.nn.init.kaiming_uniform_(torch.empty(w.shape[1], w.shape[2]), a=math.sqrt(5), generator=gen)
    u, v = kron_factors(torch.as_tensor(c["train_features"]), w, 64, hessian, gen)
    # each factor is a running average over the batches of sums over a batch's 64 samples: float32 rounding of
    # that many additions (the recursive-summation bound n * 2**-24), whose order differs between BLAS kernels
    # (2.06e-6 on an AVX-512 machine for case 0's 23 batches, 1.3e-7 to 5.1e-7 elsewhere)
    rtol = (64 + math.ceil(len(c["train_labels"]) / 64)) * 2.0 ** -24
    close(u, c[f"out_{hessian}_U"], rtol)
    close(v, c[f"out_{hessian}_V"], rtol)
    close(w.transpose(1, 2), c[f"out_{hessian}_mean"], rtol=0)


@pytest.mark.parametrize("i", range(len(OFFICIAL)), ids=IDS)
def test_posterior_predictive_and_mie_match_the_official_code(i):
    c = OFFICIAL[i]
    u_inv, v_inv = posterior(torch.as_tensor(c["out_kfac_U"]).double(), torch.as_tensor(c["out_kfac_V"]).double(),
                             c["var0"])
    close(u_inv, c["out_U_inv"])
    close(v_inv, c["out_V_inv"])
    w = _aug_weight(c)
    noise = torch.as_tensor(c["noise"])
    probs = []
    for k in range(w.shape[0]):
        lz = noise @ torch.linalg.cholesky(u_inv[k]).T.float()  # L z for each draw z
        probs.append(laplace_probs(torch.as_tensor(c["val_features"][k]), w[k].T, v_inv[k].float(), lz,
                                   float(c["temperature"][k])))
    close(torch.stack(probs), c["out_probs"])
    weights = c["flops"] / c["flops"][-1]
    close(mie_combine(torch.as_tensor(c["out_probs"]), weights), c["out_mie"])


@pytest.mark.parametrize("mie", [True, False], ids=["mie", "no-mie"])
@pytest.mark.parametrize("i", range(len(OFFICIAL)), ids=IDS)
def test_validation_grid_search_picks_the_official_values(i, mie):
    c = OFFICIAL[i]
    tag = "mie" if mie else "nomie"
    t, v = tune(torch.as_tensor(c["val_features"]), c["val_labels"], _aug_weight(c).double().transpose(1, 2),
                torch.as_tensor(c["out_kfac_U"]).double(), torch.as_tensor(c["out_kfac_V"]).double(),
                torch.as_tensor(c["noise"]).double(), c["flops"] / c["flops"][-1], mie)
    assert t == list(c[f"out_tuned_temperature_{tag}"]) and v == list(c[f"out_tuned_var0_{tag}"])
    assert set(t) <= set(TEMPERATURE_GRID) and set(v) <= set(VAR0_GRID)


# ---- the method in the harness ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
    return synthetic_task(n=300)


@pytest.fixture(scope="module", params=[True, False], ids=["mie", "no-mie"])
def fitted(request, task):
    return create_method("laplace", {"mie": request.param, "mc_samples": 20}).fit(task)


def test_stream_equals_decide_and_exit_logits(task, fitted):
    test = task.splits["test"]
    logits = fitted.exit_logits(test)
    points = [p for p in resolve_points(fitted, task, [0.3, 0.5, 0.7, 0.9]) if not p.infeasible]
    assert len(points) >= 3
    for p in points:
        exits = fitted.decide(logits, p)
        got, left_with = stream_exits(fitted, test.features, p)
        assert np.array_equal(got, exits)
        # the same arithmetic on fewer rows: equal up to the matrix kernels' summation order
        want = logits[torch.from_numpy(exits), torch.arange(len(exits))]
        assert torch.allclose(left_with, want, rtol=1e-5, atol=1e-5)
    assert len(set(np.concatenate([fitted.decide(logits, p) for p in points]))) > 1  # exits really vary


def test_exit_logits_are_log_predictives_and_mie_mixes_the_earlier_exits(task, fitted):
    test = task.splits["test"]
    probs = torch.exp(fitted.exit_logits(test).double())
    assert torch.allclose(probs.sum(-1), torch.ones(()).double(), atol=1e-5)
    own = torch.stack([fitted.exit_probs(k, test.features[k]) for k in range(task.num_exits)])
    want = mie_combine(own, fitted.mie_weights_) if fitted.mie else own
    assert torch.allclose(probs, want.double(), atol=1e-6)
    assert fitted.mie_weights_[-1] == 1.0 and np.all(np.diff(fitted.mie_weights_) > 0)


def test_costs_count_heads_variance_draws_ensemble_and_decision(task, fitted):
    plain = create_method("threshold").fit(task)
    d1, c, s = task.dim + 1, task.num_classes, fitted.mc_samples
    laplace = d1 * d1 + d1 + 1 + s * 6 * c + c + (2 * c if fitted.mie else 0)
    # threshold's exits pay D*C + 2C, ours D*C + laplace + C; the last exit pays the laplace part on top
    per_exit = laplace + c - 2 * c
    k = np.arange(1, task.num_exits + 1)
    want = plain.costs_ + np.minimum(k, task.num_exits - 1) * per_exit
    want[-1] += laplace
    np.testing.assert_array_equal(fitted.costs_, want)


def test_calibration_not_worse_than_the_plain_heads():
    """Mean over exits and 4 seeds of the tiny synthetic task: the tuned Laplace predictive (with and without
    MIE) has an ECE and an NLL no worse than the plain cross-entropy heads' (``threshold``)."""
    got = {"threshold": [], "laplace": [], "laplace-no-mie": []}
    for seed in range(4):
        task = synthetic_task(seed=seed)
        test = task.splits["test"]
        for name, m in (("threshold", create_method("threshold")),
                        ("laplace", create_method("laplace", {"mc_samples": 20})),
                        ("laplace-no-mie", create_method("laplace", {"mc_samples": 20, "mie": False}))):
            p = torch.softmax(m.fit(task).exit_logits(test).double(), -1).numpy()
            got[name].append([(ece(q.max(1), q.argmax(1) == test.labels), nll(q, test.labels)) for q in p])
    mean = {k: np.asarray(v).mean(axis=(0, 1)) for k, v in got.items()}
    for name in ("laplace", "laplace-no-mie"):
        assert mean[name][0] <= mean["threshold"][0], (name, mean)
        assert mean[name][1] <= mean["threshold"][1], (name, mean)


def test_fit_is_deterministic_and_uses_no_label_of_the_train_split_for_the_hessian(task):
    a = create_method("laplace", {"mc_samples": 5}).fit(task)
    b = create_method("laplace", {"mc_samples": 5}).fit(task)
    assert torch.equal(a.v_inv_, b.v_inv_) and torch.equal(a.lz_, b.lz_)
    assert a.temperatures_ == b.temperatures_ and a.var0s_ == b.var0s_


def test_fixed_hyper_parameters_skip_the_search(task):
    m = create_method("laplace", {"optimize_temperature": False, "optimize_var0": False, "temperature": 1.7,
                                  "var0": 0.9, "mc_samples": 5, "hessian": "kflr"}).fit(task)
    assert m.temperatures_ == [1.7] * task.num_exits and m.var0s_ == [0.9] * task.num_exits


def test_bench_check_passes():
    results = run_checks("laplace")
    failed = [r for r in results if r.status != "PASS"]
    assert not failed, failed
