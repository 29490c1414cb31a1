"""``bench run``: orchestration. The configuration is checked first (``bench.pipeline.config``); then, seed by
seed, the split, backbones and feature caches are built once (``bench.pipeline.tasks``); then the jobs (seed x
method, plus each network's static rows) run on the chosen executor, each fitting one method on the cached
features and evaluating every operating point (``bench.core.interface.resolve_points``); the tables are
assembled from the finished jobs and written atomically.

Data flow: dataset + seed -> splits -> backbone -> per-exit features [K, N, D] -> method.fit -> per-exit
logits [K, N, C] + exit decisions per operating point -> metric rows / decision rows -> files in ``--out``.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from bench.backbones.base import use_fast_cuda
from bench.base.errors import UserError
from bench.base.hashing import atomic_write_text
from bench.core.interface import create_method, resolve_points
from bench.pipeline.config import RunConfig, resolve_device, validate
from bench.pipeline.evaluate import evaluate_method, metric_row, static_backbone_rows
from bench.pipeline.executors import run_jobs
from bench.pipeline.resources import (Clock, cache_snapshot, data_env, fixed_mmap_threshold, peak_memory,
                                      stage_rates)
from bench.pipeline.risk_points import risk_points, risk_rows
from bench.pipeline.timing import DTYPE_LABELS, stage_inputs, static_timing, timing_lock, timing_metrics
from bench.pipeline.tasks import LoadedTask, cache_dir_of, load_task
from bench.results.files import metrics_frame, provenance, source_state, write_csv, write_decisions, write_json
from bench.results.risk_report import risk_table
from bench.results.summary import summary_table
from datasets import load_dataset


def prepare_out(cfg: RunConfig) -> Path:
    run_id = cfg.run_id  # derived from the whole configuration (it checks every network): once
    out = Path(cfg.out) if cfg.out else Path("results") / "runs" / run_id
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path.")
    run_json = out / "run.json"
    if run_json.exists():
        try:
            other = json.loads(run_json.read_text()).get("run_id")
        except ValueError:
            other = None
        if other != run_id:
            raise UserError(f"--out {out} holds a run of another configuration (run_id {other}, this one is "
                            f"{run_id}); its results are left untouched. Choose another --out, or drop --out "
                            "to use results/runs/<run_id>/.")
    elif out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise UserError(f"--out {out} is not empty and holds no run.json: refusing to mix results with other "
                        "files. Choose an empty or new directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not run_json.exists():  # claim the directory for this configuration before the long work starts
            write_json(run_json, {"run_id": run_id, "status": "running"})
    except OSError as e:
        raise UserError(f"Cannot write to --out {out}: {e.strerror or e}. Choose a writable directory.") from None
    return out


N_LATENCY = 64  # single images behind each batch-1 latency row


def timing_params(loaded: LoadedTask, cfg: RunConfig, timed_images: int | None = None) -> dict:
    """What a timing row was measured on: the device's name, torch, the batch of the throughput passes, the
    timing dtype (``float32``, or ``bfloat16-autocast`` with ``--timing-dtype bf16``) and, on CUDA in fp32,
    whether matmuls ran in TF32 (the figure and the table name them); with ``timed_images``, how many test images
    the throughput passes timed (``timed_images``) out of the split (``test_images``): fewer when not every test
    image fits in the device's memory."""
    cuda = cfg.device.startswith("cuda")
    device = torch.cuda.get_device_name(torch.device(cfg.device)) if cuda else (platform.processor()
                                                                                or platform.machine())
    tf32 = {"tf32": bool(torch.backends.cuda.matmul.allow_tf32)} if cuda and cfg.timing_dtype == "fp32" else {}
    counts = ({} if timed_images is None else
              {"timed_images": int(timed_images), "test_images": int(len(loaded.dataset.test_x))})
    return {"device": device, "torch": torch.__version__, "timing_batch": cfg.timing_batch,
            "dtype": DTYPE_LABELS[cfg.timing_dtype], **tf32, **counts}


def _timed_inputs(loaded: LoadedTask, cfg: RunConfig):
    """The backbone on the run's device (TF32 on CUDA, as the feature cache was computed) and the test images
    staged there once for every point (``timing.stage_inputs``: as many as fit, on CUDA)."""
    use_fast_cuda(cfg.device)
    backbone = loaded.backbone
    backbone.model.to(cfg.device).eval()
    x = stage_inputs(loaded.dataset.test_x, backbone.config.img_size, cfg.device, cfg.timing_batch, N_LATENCY)
    return backbone.stages(), x


def timing_rows(method, loaded: LoadedTask, points, cfg: RunConfig) -> list[dict]:
    """Wall-clock of the real early-exit runner on the test images per budget (``bench.pipeline.timing``):
    throughput and wall_rel (the static backbone timed on the same device, batches, images and dtype as the
    denominator) over the staged test images, batch-1 latency p50 / p90, the timed images' own cost
    (``timed_macs_rel``) and the runner's ``host_syncs_per_block``; each row's n is the number of images it was
    measured on, its params say how many test images were timed out of the split. On CUDA the whole section
    holds the GPU's timing lock (``timing.timing_lock``): no two jobs time on one card at once."""
    rows = []
    task = loaded.task
    with timing_lock(cache_dir_of(cfg), cfg.device):
        st, x = _timed_inputs(loaded, cfg)
        setup = timing_params(loaded, cfg, len(x))
        for point in points:
            if point.budget is None or point.infeasible:
                continue
            values = timing_metrics(st, method, point, loaded.dataset.test_x, loaded.backbone.config.img_size,
                                    cfg.device, cfg.timing_batch, N_LATENCY, x=x, dtype=cfg.timing_dtype,
                                    static_macs=task.macs.static)
            params = {**method.params(), **point.params, "val_macs_rel": point.val_macs_rel, **setup}
            rows += [metric_row("test", task.seed, method.name, params, point.budget, m, v, values.n[m])
                     for m, v in values.items()]
        del x  # freed before the lock is released (timing_lock returns the cached memory)
    return rows


def static_timing_rows(loaded: LoadedTask, cfg: RunConfig) -> list[dict]:
    """The static backbone's timing rows (method ``static``, no budget): throughput at the run's timing batch,
    batch-1 latency p50 / p90 and host_syncs_per_block (0), measured as the methods' rows are, under the same
    lock; their params name the setup (so they are no operating point of the static rows, whose params are
    empty)."""
    with timing_lock(cache_dir_of(cfg), cfg.device):
        st, x = _timed_inputs(loaded, cfg)
        values = static_timing(st, loaded.dataset.test_x, loaded.backbone.config.img_size, cfg.device,
                               cfg.timing_batch, N_LATENCY, x=x, dtype=cfg.timing_dtype)
        setup = timing_params(loaded, cfg, len(x))
        del x
    return [metric_row("test", loaded.task.seed, "static", setup, None, m, v, values.n[m])
            for m, v in values.items()]


def static_job(network: str, cfg: RunConfig) -> str:
    """Job name of a network's static rows: ``static`` for the run's backbone, ``static@NAME`` for another."""
    return "static" if network == cfg.run_backbone else f"static@{network}"


_PROCESS_MEMO: dict = {}  # the last seed's dataset and tasks (one per network), so in-process jobs load them once


def run_job(cfg: RunConfig, seed: int, method_name: str) -> dict:
    """One job of a sweep: fit one method on one seed's cached features and evaluate every operating point. Pure
    given the cache (built beforehand by ``execute``), so any executor may run it, and rerun it after a fault.
    Returns {"rows": metric rows, "decisions": decision blocks}, every row tagged with its backbone's label;
    ``static`` / ``static@NAME`` gives a network's static rows."""
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    if method_name.startswith("static"):
        network = method_name.partition("@")[2] or cfg.run_backbone
    else:
        network = cfg.method_backbone(method_name)
    key = (cfg.dataset, cfg.data_dir, str(cache_dir_of(cfg)), seed)
    if _PROCESS_MEMO.get("key") != key:
        _PROCESS_MEMO.clear()
        _PROCESS_MEMO.update(key=key, dataset=load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=False,
                                                                   cache_dir=cfg.cache_dir),
                             loaded={})
    memo = _PROCESS_MEMO["loaded"]
    if network not in memo:
        memo[network] = load_task(cfg, seed, network, _PROCESS_MEMO["dataset"])
    loaded = memo[network]
    label = loaded.backbone.label
    if method_name.startswith("static"):
        rows = static_backbone_rows(loaded.task)
        if cfg.timing:
            rows += static_timing_rows(loaded, cfg)
        return {"rows": [{**r, "backbone": label} for r in rows], "decisions": []}
    method = create_method(method_name, cfg.method_overrides(method_name)).fit(loaded.task)
    points = resolve_points(method, loaded.task, cfg.budgets)
    spec = cfg.risk_spec()
    risky = risk_points(method, loaded.task, spec) if spec else []  # --risk: the score rule's certified points
    rows, decisions = evaluate_method(method, loaded.task, points + risky)
    rows += risk_rows(method, loaded.task, risky, spec) if spec else []
    if cfg.timing and not method.bound:
        rows += timing_rows(method, loaded, points, cfg)
    return {"rows": [{**r, "backbone": label} for r in rows], "decisions": decisions}


def execute(cfg: RunConfig, log=print) -> Path:
    """Run the whole job; returns the output directory. Raises UserError for user mistakes.

    A run is a sweep of independent jobs (seed x method, plus the static backbone per seed). Shared artefacts
    (splits, backbones, features) are built first, in this process, seed by seed; then the jobs run on the
    chosen executor and each writes its result file atomically under ``OUT/jobs/``; the tables are assembled
    from those files. Rerunning the same command with the same ``--out`` skips finished jobs. run.json records
    the data settings taken from the environment (``env``) and, measured at the end, the peak memory and the
    images per second of the stages that ran here (``resources``: ``bench.pipeline.resources``)."""
    asked = cfg.device
    cfg = dataclasses.replace(cfg, device=resolve_device(asked))
    validate(cfg)
    seen = f"torch sees {torch.cuda.get_device_name(0)}" if cfg.device != "cpu" else "torch sees no CUDA device"
    log(f"device: {cfg.device}" + (f" (--device auto: {seen})" if asked == "auto" else ""))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mmap_threshold = fixed_mmap_threshold()  # freed batch buffers go back to the system (bench.pipeline.resources)
    out = prepare_out(cfg)
    t0, source = time.time(), source_state()  # the code this process imported, not what is committed later
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, cache_dir=cfg.cache_dir)
    log(f"dataset {dataset.name}: {len(dataset.train_y)} train / {len(dataset.test_y)} test images, "
        f"{dataset.num_classes} classes (files and checksums in run.json)")
    seeds_info: dict[int, dict] = {}
    labels = {}
    stages: list[dict] = []  # images per second of the backbone trainings and feature passes run here
    for seed in cfg.seeds:
        for network in cfg.networks():
            before = cache_snapshot(cache_dir_of(cfg))
            with Clock() as clock:
                loaded = load_task(cfg, seed, network, dataset)
            stages += stage_rates(cfg, loaded, network, before, clock.seconds)
            splits, backbone, task = loaded.splits, loaded.backbone, loaded.task
            labels[network] = backbone.label
            info = {"backbone": backbone.label, "backbone_key": backbone.key,
                    "backbone_val_accuracy": backbone.val_accuracy,
                    "backbone_best_epoch": backbone.best_epoch,
                    "backbone_train_seconds": (backbone.history[-1].get("seconds") if backbone.history else None),
                    "static_macs": task.macs.static}
            if network == cfg.run_backbone:
                seeds_info[seed] = {"split_sha256": splits.sha256, **info,
                                    "split_sizes": {k: int(len(splits[k])) for k in ("train", "val", "cal", "test")}}
            else:
                seeds_info[seed].setdefault("other_backbones", {})[network] = info
    jobs = [(seed, name) for seed in cfg.seeds
            for name in [*(static_job(n, cfg) for n in cfg.static_networks()), *cfg.methods]]
    try:
        results = run_jobs(cfg, jobs, out / "jobs", log, run_job)  # JobFailures (exit 1) names the failed jobs
        rows = [r for job in jobs for r in results[job]["rows"]]
        decisions = [d for job in jobs for d in results[job]["decisions"]]
        run_id = cfg.run_id
        df = metrics_frame(rows, run_id, dataset.name, labels[cfg.run_backbone],
                           {seed: info["split_sha256"] for seed, info in seeds_info.items()})
        summary = summary_table(df)
        risk = risk_table(df)  # --risk: the risk-controlled points' risks and guarantee check
        summary += f"\n\n{risk}" if risk else ""
        write_decisions(decisions, out / "decisions.csv.gz")
        write_csv(df, out / "metrics.csv")
        atomic_write_text(out / "summary.md", summary + "\n")
        config = {**dataclasses.asdict(cfg), "resolved_backbones": {
            n: {"backbone": n, "label": labels[n], **dataclasses.asdict(cfg.backbone_config(n))} for n in cfg.networks()}}
        env = data_env()  # the data settings from the environment, shown before the command on the results page
        resources = {**peak_memory(cfg.device), "network": cfg.run_backbone, "stages": stages,
                     "malloc_mmap_threshold_bytes": mmap_threshold}
        write_json(out / "run.json", {"run_id": run_id, "status": "complete", **provenance(config, {
            **source, "dataset_source": dataset.source, "seeds": seeds_info, **({"env": env} if env else {}),
            "resources": resources, "duration_s": round(time.time() - t0, 2)}, cfg.argv)})
    except OSError as e:  # full disk, read-only or vanished --out: every file is replaced atomically
        raise UserError(f"Could not write the results to {out} ({e.strerror or e}). Files written before are "
                        "intact (each is replaced atomically) and finished jobs are kept in its jobs/ folder: free "
                        "space or fix the directory, then rerun the same command to resume.") from None
    log("\n" + summary + "\n")
    log(f"results written to {out}/ (metrics.csv, decisions.csv.gz, run.json, summary.md)")
    return out
