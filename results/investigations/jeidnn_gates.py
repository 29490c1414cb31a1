"""Is JEI-DNN held back by its fixed 0.5 exit rule, or by what its gates learned?

Fits JEI-DNN on one seed's cached backbone features (trained and cached by `python -m bench run` if absent),
then, for a few lambdas, evaluates on test at each budget:
  1. the paper's rule (the native point: no budget knob),
  2. the gates' conditional exit probability q_l = g_l / (1 - sum_{k<l} g_k) as a score, one threshold per
     budget calibrated on validation with the harness's shared function (a deviation from the paper),
  3. max-softmax on the same lambda's IMs, calibrated the same way,
next to `threshold` (max-softmax on the shared cross-entropy heads).

    .venv/bin/python results/investigations/jeidnn_gates.py --dataset fashion-mnist --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import methods  # noqa: E402,F401
from bench.core.interface import create_method  # noqa: E402
from bench.measure.calibration import calibrate_shared_threshold, first_exit  # noqa: E402
from bench.pipeline.config import RunConfig  # noqa: E402
from bench.pipeline.tasks import load_task  # noqa: E402

BUDGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def evaluate(costs_rel, val_scores, test_scores, test_logits, labels) -> str:
    cells = []
    for b, r in zip(BUDGETS, calibrate_shared_threshold(val_scores, costs_rel, BUDGETS)):
        if r is None:
            cells.append("infeasible")
            continue
        e = first_exit(test_scores, r[0])
        acc = (test_logits[e, np.arange(len(e))].argmax(1).numpy() == labels).mean()
        cells.append(f"{acc:.4f} @ {costs_rel[e].mean():.3f}")
    return " | ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lambdas", default="0.01,0.3,5")
    args = ap.parse_args()
    task = load_task(RunConfig(methods=[], dataset=args.dataset), args.seed).task
    val, test = task.splits["val"], task.splits["test"]
    print(f"{args.dataset}, seed {args.seed}, test accuracy @ realised macs_rel per budget "
          f"({', '.join(map(str, BUDGETS))})\n")
    th = create_method("threshold").fit(task)
    rel = th.costs_ / task.macs.static
    print("threshold (shared CE heads):", evaluate(rel, th.scores(th.exit_logits(val)),
                                                   th.scores(th.exit_logits(test)), th.exit_logits(test), test.labels))
    jei = create_method("jeidnn", {"lambdas": [float(x) for x in args.lambdas.split(",")]}).fit(task)
    rel = jei.costs_ / task.macs.static
    for point in jei.operating_points(task, []):
        lam = point.params["lambda"]
        lv, lt = jei.exit_logits(val, point), jei.exit_logits(test, point)
        e = jei.decide(lt, point)
        acc = (lt[e, np.arange(len(e))].argmax(1).numpy() == test.labels).mean()
        print(f"\nlambda {lam}: paper's 0.5 rule: {acc:.4f} @ {rel[e].mean():.3f} (one point, no budget knob)")

        def conditional(logits):
            g = jei.gate_outputs(logits, point)  # [K-1, N]
            before = np.concatenate([np.zeros((1, g.shape[1])), np.cumsum(g, 0)[:-1]])
            return np.concatenate([g / np.clip(1 - before, 1e-12, None), np.zeros((1, g.shape[1]))])

        print("  gate score, calibrated:   ", evaluate(rel, conditional(lv), conditional(lt), lt, test.labels))
        msp = lambda lg: torch.softmax(lg.double(), -1).amax(-1).numpy()  # noqa: E731
        print("  its IMs + max-softmax:    ", evaluate(rel, msp(lv), msp(lt), lt, test.labels))


if __name__ == "__main__":
    main()
