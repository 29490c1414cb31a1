"""Command line: ``python -m bench run | ls``.

User mistakes (bad flags, unknown names, missing data) print one paragraph and exit with code 2; no
traceback. ``--debug`` shows the traceback anyway.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

import methods  # noqa: F401  (registers the methods)
from bench.backbones.base import BACKBONES
from bench.base.errors import UserError
from bench.core import conformance
from bench.core.interface import METHODS
from bench.pipeline.config import DEFAULT_BUDGETS, RunConfig
from bench.pipeline.run import execute
from bench.results.page import build_page
from bench.results.report import build_report
from datasets import list_datasets


def _csv_list(kind: str, convert):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{kind} list is empty")
        try:
            return [convert(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"could not read {text!r} as a comma-separated list of {kind}")

    return parse


def parse_set(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["threshold.epochs=5", "backbone.depth=4"]`` -> {"threshold": {"epochs": 5}, "backbone": {"depth": 4}}.
    Values are read as JSON when they parse (numbers, true/false, lists), else kept as strings."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        target, dot, name = key.partition(".")
        if not sep or not dot or not target or not name:
            raise UserError(f"--set {item!r} is malformed: write --set METHOD.FIELD=VALUE, backbone.FIELD=VALUE or "
                            "backbone.NETWORK.FIELD=VALUE, e.g. --set threshold.epochs=10.")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(target, {})[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark harness for early-exit networks.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train/fit, evaluate at budgets, write tidy results")
    r.add_argument("--methods", type=_csv_list("method names", str), default=["threshold", "entropy"],
                   help="comma-separated methods (default: threshold,entropy)")
    r.add_argument("--dataset", default="digits", help="dataset name (default: digits, embedded)")
    r.add_argument("--backbone", default=None,
                   help="a registered backbone (vit, msdnet; `bench ls`) or a timm ViT name (default: vit, the "
                        "dataset's small ViT)")
    r.add_argument("--seeds", type=_csv_list("integers", int), default=[0], help="e.g. 0,1,2 (default: 0)")
    r.add_argument("--budgets", type=_csv_list("numbers", float), default=None,
                   help="target macs_rel values in (0, 1] (default: 0.25,0.5,0.75,1.0)")
    r.add_argument("--risk", type=_csv_list("numbers", float), default=None, metavar="EPS,...",
                   help="risk levels in (0, 1): each score rule also gets the threshold that controls its risk "
                        "against the last exit at that level, set on the cal split (instead of --budgets, or with "
                        "it), e.g. --risk 0.01,0.02,0.05")
    r.add_argument("--delta", type=float, default=None,
                   help="with --risk: the confidence delta in (0, 1), P(test risk > eps) <= delta (default 0.1)")
    r.add_argument("--risk-method", type=_csv_list("procedures", str), default=None, metavar="ucb|ltt|crc|naive",
                   help="with --risk: the procedure(s), comma-separated: ucb (Waudby-Smith-Ramdas bound, the "
                        "default), ltt (Learn-then-Test), crc (conformal risk control: risk <= eps in expectation) "
                        "or naive (empirical risk, no guarantee)")
    r.add_argument("--risk-loss", default=None, metavar="disagreement|accuracy",
                   help="with --risk: the risk, disagreement (prediction differs from the last exit's; default) or "
                        "accuracy (the accuracy drop against the last exit)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="TARGET.FIELD=VALUE",
                   help="override a field of a method (METHOD.FIELD), of the run's backbone (backbone.FIELD) or of "
                        "another network of the run (backbone.NAME.FIELD); repeatable")
    r.add_argument("--out", default=None, help="output directory (default: results/runs/<run_id>/)")
    r.add_argument("--data-dir", default=None,
                   help="folder with the dataset's official files; with --dataset imagefolder, your image folder or "
                        "a .zip/.tar(.gz) of it (train/ and test/ class folders, or one tree of class folders)")
    r.add_argument("--cache-dir", default=None, help="splits/backbones/features cache (default: ~/.cache/bench)")
    r.add_argument("--device", default="auto",
                   help="auto (the default: CUDA when torch sees one, else CPU; printed first), cpu or cuda")
    r.add_argument("--threads", type=int, default=None, help="torch threads per job")
    r.add_argument("--compile", action="store_true",
                   help="train backbones with a torch.compile'd step (off by default: on a 2-core CPU it compiled for "
                        "minutes and ran no faster; worth trying on a GPU). Its checkpoints are cached apart")
    r.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="PATH",
                   help="fine-tune pretrained weights: timm's hub weights of --backbone NAME, or a local "
                        ".safetensors/.pth checkpoint of it (its sha256 is recorded)")
    r.add_argument("--no-download", dest="download", action="store_false", help="never download data")
    r.add_argument("--timing", action="store_true",
                   help="time real early exit on test: latency_ms (batch 1), throughput and wall_rel per budget")
    r.add_argument("--timing-batch", type=int, default=256, help="batch size of the throughput timing (256)")
    r.add_argument("--timing-dtype", default="fp32", metavar="fp32|bf16",
                   help="dtype of the timed passes, early exit and static alike: fp32 (default) or bf16 (bfloat16 "
                        "autocast); recorded in the timing rows")
    r.add_argument("--executor", default="sequential", help="sequential (default), local (process pool) or dask")
    r.add_argument("--workers", type=int, default=2, help="processes of the local executor (default 2)")
    r.add_argument("--scheduler", default=None, help="Dask scheduler address for --executor dask, tcp://HOST:PORT")
    r.add_argument("--retries", type=int, default=1, help="extra attempts for a failed job (default 1)")

    sub.add_parser("ls", help="list methods, datasets and backbones")

    c = sub.add_parser("check", help="run the conformance suite on methods (a small synthetic task)")
    c.add_argument("methods", nargs="+", metavar="METHOD", help="registered method names, or `all`")

    rep = sub.add_parser("report", help="aggregate runs over seeds: tables (md, tex), paired comparisons, figures")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.csv)")
    rep.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report/ of the first run)")
    rep.add_argument("--page", default=None, metavar="PATH",
                     help="(re)write a markdown results page instead (e.g. results/README.md): per run its command, "
                          "machine, table and figures (saved in PATH's folder under figures/); with --out, both")
    rep.add_argument("--split", default="test", help="split to report (default: test)")
    rep.add_argument("--budget", type=float, default=None,
                     help="budget of the exit-distribution figure (default: the middle budget)")
    return p


def risk_options(args) -> dict[str, Any]:
    """RunConfig's risk fields from --risk / --delta / --risk-method / --risk-loss (the last three need --risk)."""
    given = {k: v for k, v in (("risk_delta", args.delta), ("risk_methods", args.risk_method),
                               ("risk_loss", args.risk_loss)) if v is not None}
    if args.risk is None:
        if given:
            raise UserError("--delta, --risk-method and --risk-loss configure risk-controlled thresholds: add --risk "
                            "EPS,... (risk levels in (0, 1)), or drop them.")
        return {}
    return {"risk": args.risk, **given}


def cmd_run(args) -> int:
    risk = risk_options(args)
    # --risk alone evaluates the risk levels only; --budgets with it, both
    budgets = args.budgets or ([] if risk else list(DEFAULT_BUDGETS))
    cfg = RunConfig(methods=args.methods, dataset=args.dataset, backbone=args.backbone, seeds=args.seeds,
                    budgets=budgets, overrides=parse_set(args.overrides), **risk,
                    pretrained=args.pretrained, device=args.device, threads=args.threads, compile=args.compile,
                    data_dir=args.data_dir, cache_dir=args.cache_dir, out=args.out, download=args.download,
                    timing=args.timing, timing_batch=args.timing_batch, timing_dtype=args.timing_dtype,
                    executor=args.executor,
                    workers=args.workers, scheduler=args.scheduler, retries=args.retries, argv=args.argv)
    execute(cfg)
    return 0


def cmd_ls(args) -> int:
    print("methods:")
    for name in METHODS.names():
        doc = (sys.modules[METHODS.get(name).__module__].__doc__ or "").strip().splitlines()
        print(f"  {name:12s} {doc[0] if doc else ''}")
    vit = BACKBONES.get("vit")
    print("datasets:")
    for name in list_datasets():
        print(f"  {name:14s} default backbone: {vit.label(vit.default_config(name))}")
    print("backbones (--backbone NAME; fields with --set backbone.FIELD=VALUE):")
    for name in BACKBONES.names():
        plugin = BACKBONES.get(name)
        doc = (plugin.__doc__ or "").strip().splitlines()
        print(f"  {name:15s} {doc[0] if doc else ''}")
        print(f"  {'':15s} fields: {', '.join(f.name for f in dataclasses.fields(plugin.Config))}")
    print("  (a timm ViT/DeiT name, e.g. --backbone vit_small_patch16_224, selects the vit backbone with that model)")
    return 0


def cmd_check(args) -> int:
    names = METHODS.names() if "all" in args.methods else list(dict.fromkeys(args.methods))
    for name in names:
        METHODS.get(name)  # unknown names fail before any work, with "did you mean"
    task = conformance.default_task()
    bad = 0
    for name in names:
        results = conformance.run_checks(name, task)
        print(f"== {name}: {sum(r.seconds for r in results):.1f} s", flush=True)
        for r in results:
            print(f"{r.status:<5}  {r.name:<24}  {r.message}".rstrip(), flush=True)
        bad += sum(r.status in ("FAIL", "XPASS") for r in results)
    return 1 if bad else 0


def cmd_report(args) -> int:
    if args.page is None or args.out is not None:
        report = build_report(args.run_dirs, out=args.out, split=args.split, budget=args.budget)
        print(report.markdown)
        print(f"wrote {len(report.files)} files to {report.out}")
    if args.page is not None:
        written = build_page(args.run_dirs, args.page, split=args.split, budget=args.budget)
        print(f"wrote {args.page} and {len(written) - 1} figure(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv) if argv is None else ["python -m bench", *argv]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return {"run": cmd_run, "ls": cmd_ls, "check": cmd_check, "report": cmd_report}[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished jobs are kept (OUT/jobs/) and earlier results are intact; rerun the same "
              "command to resume", file=sys.stderr)
        return 130


def main_entry() -> None:
    """The ``bench`` console script."""
    sys.exit(main())
