"""``python -m bench.gpu_check [--out DIR] [--dry] [--data PATH] [--no-fvcore]``: the device check, in one call.

``make gpu-check`` runs it on a machine with a CUDA device (results in ``$OUT``, else ``results/gpu-check/``);
``make gpu-check-dry`` runs the same code end to end on the CPU at tiny sizes (about a minute on 2 cores, no data
needed), with fvcore blocked as on a lent GPU machine. It needs only the working tree and an interpreter that
imports torch, timm, numpy, scipy, pandas, scikit-learn, Pillow, matplotlib and seaborn (a lent machine's
``python3``: no project venv, no fvcore, no network; pytest optional); it sets ``HF_HUB_OFFLINE=1``. MACs are
counted by fvcore where it is installed, else analytically (ViT) or by torch's counter (MSDNet):
``macs_counter`` records which. It prints its time estimate first; sized for 8 minutes on one H100 (the
CIFAR-10 run trains for what the limit leaves). It writes ``gpu-check.json`` (every figure, each section's status,
error and seconds) and ``gpu-check.md`` (the same figures as tables, naming the device), both rewritten after each
section (a check stopped at a time limit keeps what it finished and names what it did not reach), plus the bench
run of the last section under ``run/``; it prints their paths and exits 1 when any section failed (the others
still ran), 2 on a usage error (no CUDA device without ``--dry``).

Sections:
1. ``cuda_tests``: pytest on the CUDA tests (``CUDA_TESTS``; they skip without a GPU), pass/fail/skip counts
   (skipped with a note where pytest is not importable); ``runner_vs_simulation``: the real early-exit runner
   against the simulation from the feature cache on the device, for every deployable method
   (``bench.pipeline.runner.compare_with_simulation``): exit mismatches, prediction flips, largest logit difference.
2. ``throughput``: training (the harness's ``train``, bf16 autocast on CUDA; the first epoch is warm-up) and
   feature-extraction (``compute_features``, fp32 with TF32 on CUDA) images per second for ViT-S/16 at 224 px
   (timm ``vit_small_patch16_224``, random init) and for the CIFAR-size ViT (12 blocks, 192 wide, 4-px patches).
3. ``early_exit_timing`` (``early_exit.py``): every deployable method on the ViT (jeidnn, jeidnn_consistent,
   patience, boostednet, threshold, entropy) fitted on exit features of synthetic images and timed by the real
   runner at budget 0.5, batch 256 and batch 1, on ViT-S/16-224 and on the CIFAR-size ViT: ``macs_rel``,
   ``wall_rel``, ``host_syncs_per_block``, latency; the target ``wall_rel <= 1.1 x macs_rel`` at batch 256 on
   ViT-S/16-224 gets pass or fail per method on CUDA (no verdict on the CPU).
4. ``cifar10_from_scratch``: ``python -m bench run --dataset imagefolder --data-dir <tar.gz> --methods
   threshold,entropy,jeidnn --timing`` on the CIFAR-10 photographs with the from-scratch 32 px ViT (JEI-DNN: 2
   warm-up epochs within 8, so at least 6 joint ones), then ``bench report``. The archive: ``--data`` or ``$DATA``,
   else ``<repo>/shared/data/cifar10-jpeg.tar.gz``, else ``<repo>/../shared/data/``; skipped with a note when
   none exists (``--dry``: a generated image folder).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no network: a hub lookup would hang, and weights cannot be fetched anyway
os.environ.setdefault("TQDM_DISABLE", "1")  # one line per section instead of progress bars

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import methods  # noqa: E402,F401  (registers the methods)
from bench.base.errors import UserError  # noqa: E402
from bench.base.hashing import atomic_write_text  # noqa: E402
from bench.gpu_check.common import (CUDA_TESTS, DRY, FULL, FVCORE_MODULES, ROOT, SectionFailed,  # noqa: E402,F401
                                    SectionSkipped, Sizes, block_fvcore, data_candidates, device_name, find_data,
                                    fvcore_version)
from bench.gpu_check.early_exit import early_exit_timing  # noqa: E402
from bench.gpu_check.report import markdown  # noqa: E402
from bench.gpu_check.sections import (cifar10_from_scratch, cuda_tests, runner_vs_simulation,  # noqa: E402,F401
                                      throughput, write_image_folder)
from bench.measure.flops import ANALYTIC, FVCORE, fvcore_available  # noqa: E402

SECTIONS = (("cuda_tests", cuda_tests), ("runner_vs_simulation", runner_vs_simulation),
            ("throughput", throughput), ("early_exit_timing", early_exit_timing),
            ("cifar10_from_scratch", cifar10_from_scratch))


def run_sections(ctx: dict, log=print, after=None) -> dict:
    """Each section in turn, each wrapped: a failure is recorded (error and traceback) and the next one runs.
    ``after(results)``, if given, is called after each section (the files are rewritten: a check stopped at a time
    limit keeps the figures of the sections it finished)."""
    results = {}
    for name, fn in SECTIONS:
        t0 = time.perf_counter()
        log(f"gpu-check: {name} ...", flush=True)
        try:
            entry = {"status": "ok", **fn(ctx)}
        except SectionSkipped as e:
            entry = {"status": "skipped", "note": str(e)}
        except Exception as e:  # noqa: BLE001  (recorded; the other sections still run)
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-3000:], **getattr(e, "partial", {})}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = entry
        log(f"gpu-check: {name} {entry['status']} in {entry['seconds']:.0f} s"
            + (f": {entry.get('error') or entry.get('note')}" if entry["status"] != "ok" else ""), flush=True)
        if after is not None:
            after(results)
    return results


def estimate(sizes: Sizes) -> dict[str, float]:
    """Expected seconds of each section to run, on ``sizes.estimate_for``."""
    return {name: float(sizes.estimate_s.get(name, 0)) for name, _ in SECTIONS}


def estimate_line(sizes: Sizes) -> str:
    est = estimate(sizes)
    total = sum(est.values())
    return (f"gpu-check: estimated {total:.0f} s ({total / 60:.1f} min) on {sizes.estimate_for}, within its "
            f"{sizes.time_limit_s:.0f} s limit: " + ", ".join(f"{k} {v:.0f} s" for k, v in est.items()))


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else results/gpu-check/, "
                                               "results/gpu-check-dry/ with --dry)")
    p.add_argument("--dry", action="store_true", help="the same code path on the CPU at tiny sizes (about a minute)")
    p.add_argument("--data", default=None,
                   help="the CIFAR-10 photographs archive (default: $DATA, else the first of "
                        f"{', '.join(str(c) for c in data_candidates(env={}))} that exists)")
    p.add_argument("--no-fvcore", action="store_true",
                   help="block fvcore (as on a lent GPU machine, which has none): MACs by the fallback counters")
    return p


def main(argv: list[str] | None = None, log=print) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "results" / ("gpu-check-dry" if args.dry else "gpu-check"))
    sizes = DRY if args.dry else FULL
    log(estimate_line(sizes), flush=True)  # first: what the check is about to cost
    if args.dry:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("error: torch sees no CUDA device; run the CPU dry run with --dry (make gpu-check-dry)",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot write to --out {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    saved_fvcore = {n: sys.modules[n] for n in FVCORE_MODULES if n in sys.modules}
    ctx = {"device": device, "dry": args.dry, "sizes": sizes, "out": str(out), "tmp": tmp, "data": args.data,
           "deadline": t0 + sizes.time_limit_s,
           "sub_env": block_fvcore(Path(tmp) / "no-fvcore") if args.no_fvcore else {}}
    data, looked = find_data(args.data)
    log(f"gpu-check on {device_name(device)}{' (dry run)' if args.dry else ''} with {sys.executable}; results in "
        f"{out}/", flush=True)
    threads = torch.get_num_threads()
    if args.dry:  # one thread: on a small shared CPU a second one mostly waits for its turn (100 ms stalls)
        torch.set_num_threads(1)
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    fixed = {"device": device, "device_name": device_name(device), "dry": args.dry, "torch": torch.__version__,
             "cuda": torch.version.cuda, "python": platform.python_version(), "python_executable": sys.executable,
             "git_sha": _git_sha(), "fvcore": fvcore_version(), "fvcore_blocked": args.no_fvcore,
             "data": None if args.dry else (str(data) if data else None),
             "data_looked_at": [] if args.dry else [str(p) for p in looked],
             "estimate_s": estimate(sizes), "estimate_for": sizes.estimate_for, "time_limit_s": sizes.time_limit_s,
             "command": shlex.join(["python", "-m", "bench.gpu_check", *(argv if argv is not None else sys.argv[1:])])}
    expected_counter = FVCORE if fvcore_available() else ANALYTIC  # the ViT's, before any task is built
    report: dict = {}

    def save(sections: dict) -> None:  # after each section: the last call writes the final files
        counters = ctx.get("macs_counters", {})
        report.clear()
        report.update(fixed, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      total_seconds=round(time.perf_counter() - t0, 1),
                      macs_counter=", ".join(sorted(set(counters.values()))) or expected_counter,
                      macs_counters=dict(counters),
                      failed=[k for k, v in sections.items() if v["status"] == "failed"],
                      not_reached=[name for name, _ in SECTIONS if name not in sections], sections=sections)
        atomic_write_text(json_path, json.dumps(report, indent=1, default=str) + "\n")
        atomic_write_text(md_path, markdown(report) + "\n")

    try:
        sections = run_sections(ctx, log, after=save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
        if args.no_fvcore:  # --no-fvcore lasts for the check only
            for name in FVCORE_MODULES:
                if name in saved_fvcore:
                    sys.modules[name] = saved_fvcore[name]
                else:
                    sys.modules.pop(name, None)
    failed = report["failed"]
    log(f"gpu-check: {len(sections) - len(failed)}/{len(sections)} sections without failure in "
        f"{report['total_seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    log(f"wrote {json_path}")
    log(f"wrote {md_path}")
    return 1 if failed else 0


def cli() -> None:
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
