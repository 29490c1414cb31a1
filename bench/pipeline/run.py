"""``bench run``: resolve the configuration, then for each seed build (or load) the split, backbone and
feature cache once, fit every method on the cached features, evaluate every budget and write the results.

Data flow: dataset + seed -> splits -> backbone -> per-block features [K, N, D] -> method.fit -> per-exit
logits [K, N, C] + exit decisions per budget -> metric rows / decision rows -> files in ``--out``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.backbones.vit import (BackboneConfig, create_backbone, default_config, exit_head_params, head_params,
                            load_or_train_backbone)
from bench.base.errors import UserError
from bench.pipeline.evaluate import evaluate_method, metric_row, static_backbone_rows
from bench.pipeline.features import load_or_compute_features
from bench.measure.flops import ViTMacs, analytic_vit_macs, fvcore_vit_macs
from bench.backbones.msdnet import MSDNet, MSDNetConfig, default_msdnet_config, msdnet_macs
from bench.base.hashing import atomic_write_text, config_hash
from bench.core.interface import METHODS, create_method
from bench.results.files import decisions_frame, metrics_frame, provenance, write_csv, write_json
from bench.pipeline.splits import load_or_make_splits
from bench.results.summary import summary_table
from bench.core.task import SplitData, Task

DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
# The networks a job can run on: the run's timm ViT (frozen; methods train heads on its cached features), MSDNet
# trained with the sum of its exits' cross-entropies, and MSDNet trained as BoostedNet. A method picks one from
# the run's backbone (ExitMethod.backbone_for): ``msdnet`` always brings its own network.
BACKBONE_KINDS = ("vit", "msdnet", "msdnet-boosted")
MSDNET_FIELDS = frozenset(f.name for f in dataclasses.fields(MSDNetConfig))


def default_cache_dir() -> Path:
    base = os.environ.get("BENCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bench")
    return Path(base)


@dataclass
class RunConfig:
    methods: list[str]
    dataset: str = "digits"
    backbone: str | None = None  # timm model name or "msdnet"; None: the dataset's default ViT
    seeds: list[int] = field(default_factory=lambda: [0])
    budgets: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    # {"threshold": {"epochs": 5}, "backbone": {"depth": 4}}: from --set METHOD.FIELD=VALUE
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    pretrained: bool = False
    device: str = "cpu"
    threads: int | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    out: str | None = None
    download: bool = True
    timing: bool = False  # time real early exit on test (latency, throughput, wall_rel) per budget
    timing_batch: int = 256
    executor: str = "sequential"  # sequential | local (process pool) | dask
    workers: int = 2  # local executor's processes
    scheduler: str | None = None  # dask scheduler address, tcp://HOST:PORT
    retries: int = 1  # extra attempts for a failed job before the run reports it

    @property
    def backbone_kind(self) -> str:
        """The run's backbone: ``msdnet`` or ``vit``."""
        return "msdnet" if self.backbone == "msdnet" else "vit"

    def method_kind(self, method: str) -> str:
        """The backbone kind a method's jobs run on."""
        kind = METHODS.get(method).backbone_for(self.backbone_kind)
        assert kind in BACKBONE_KINDS, kind
        return kind

    def kinds(self) -> list[str]:
        """Every backbone kind this run trains, the run's own first."""
        return list(dict.fromkeys([self.backbone_kind, *(self.method_kind(m) for m in self.methods)]))

    def static_kinds(self) -> list[str]:
        """The networks whose static rows are written (BoostedNet's training has no static network of its own:
        its architecture and cost are MSDNet's)."""
        return list(dict.fromkeys([self.backbone_kind, *(k.replace("-boosted", "") for k in self.kinds())]))

    def method_overrides(self, method: str) -> dict[str, Any]:
        """``--set METHOD.FIELD`` values for the method itself (``msdnet.FIELD`` also configures MSDNet's
        network: those keys are the network's, see ``backbone_config``)."""
        o = dict(self.overrides.get(method, {}))
        if method == "msdnet":
            o = {k: v for k, v in o.items() if k not in MSDNET_FIELDS}
        return o

    def backbone_config(self, kind: str | None = None) -> "BackboneConfig | MSDNetConfig":
        kind = kind or self.backbone_kind
        if kind != "vit":
            return self.msdnet_config(kind)
        cfg = default_config(self.dataset)
        changes: dict[str, Any] = dict(self.overrides.get("backbone", {}))
        if self.backbone:
            changes["model"] = self.backbone
        if self.pretrained:
            changes["pretrained"] = True
        names = {f.name for f in dataclasses.fields(BackboneConfig)}
        bad = sorted(set(changes) - names)
        if bad:
            raise UserError(f"--set backbone.{bad[0]}: the backbone has no field {bad[0]!r}. "
                            f"Fields: {', '.join(sorted(names))}.")
        return cfg.replace(**changes)

    def msdnet_config(self, kind: str = "msdnet") -> MSDNetConfig:
        """MSDNet's configuration: the dataset's default, then ``--set backbone.FIELD`` (when ``--backbone
        msdnet``), then ``--set msdnet.FIELD``; ``msdnet-boosted`` is the same network trained as BoostedNet."""
        changes: dict[str, Any] = dict(self.overrides.get("backbone", {})) if self.backbone_kind == "msdnet" else {}
        for name, value in self.overrides.get("msdnet", {}).items():
            if name not in MSDNET_FIELDS:
                continue  # the msdnet method's own fields
            if name in changes and changes[name] != value:
                raise UserError(f"--set backbone.{name}={changes[name]} and --set msdnet.{name}={value} disagree; "
                                "both configure the one MSDNet of this run. Give one of them.")
            changes[name] = value
        if kind == "msdnet-boosted":  # trained with the ensemble weight the boostednet method combines with
            weight = self.overrides.get("boostednet", {}).get("boost_weight", MSDNetConfig.boost_weight)
            if changes.get("boost_weight", weight) != weight:
                raise UserError(f"MSDNet's boost_weight={changes['boost_weight']} differs from boostednet's "
                                f"({weight}), which combines the exits: set it once, with --set "
                                "boostednet.boost_weight=VALUE.")
            changes.update(training="boosted", boost_weight=weight)
        bad = sorted(set(changes) - MSDNET_FIELDS)
        if bad:
            raise UserError(f"--set backbone.{bad[0]}: MSDNet has no field {bad[0]!r}. "
                            f"Fields: {', '.join(sorted(MSDNET_FIELDS))}.")
        for name in ("gr_factor", "bn_factor", "lr_milestones"):
            if name in changes and isinstance(changes[name], list):
                changes[name] = tuple(changes[name])
        return default_msdnet_config(self.dataset).replace(**changes)

    def identity(self) -> dict:
        """What determines the numbers (not where files live, nor the thread count)."""
        out = {"methods": self.methods, "dataset": self.dataset, "seeds": self.seeds, "budgets": self.budgets,
               "backbone": dataclasses.asdict(self.backbone_config()),
               "method_params": {m: create_method(m, self.method_overrides(m)).params() for m in self.methods},
               "device": self.device}
        others = {k: dataclasses.asdict(self.backbone_config(k)) for k in self.kinds() if k != self.backbone_kind}
        if others:  # absent for single-backbone runs, so their run ids are unchanged
            out["other_backbones"] = others
        return out

    @property
    def run_id(self) -> str:
        return config_hash(self.identity(), 12)


def validate(cfg: RunConfig) -> None:
    """Check every user input before any expensive work starts."""
    import methods  # noqa: F401  (registers the methods)
    from datasets import list_datasets
    from bench.base.registry import unknown_name_message

    if not cfg.methods:
        raise UserError("No methods given: pass --methods, e.g. --methods threshold,entropy.")
    for m in cfg.methods:
        METHODS.get(m)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise UserError(f"--methods lists a method twice: {','.join(cfg.methods)}.")
    if cfg.dataset not in list_datasets():
        raise UserError(unknown_name_message("dataset", cfg.dataset, list_datasets()))
    uses_msdnet = cfg.backbone_kind == "msdnet" or any(cfg.method_kind(m) != "vit" for m in cfg.methods)
    for key in cfg.overrides:
        if key != "backbone" and key not in cfg.methods and not (key == "msdnet" and uses_msdnet):
            raise UserError(f"--set {key}.FIELD=...: {key!r} is neither 'backbone' nor one of the methods of "
                            f"this run ({', '.join(cfg.methods)}).")
    for b in cfg.budgets:
        if not (0 < b <= 1) or not np.isfinite(b):
            raise UserError(f"Budget {b} is outside (0, 1]: a budget is a target mean cost relative to the "
                            "static backbone, e.g. --budgets 0.25,0.5,0.75,1.0.")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device {cfg.device!r}: use cpu or cuda.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device here; use --device cpu.")
    if any(seed < 0 for seed in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds {','.join(map(str, cfg.seeds))}: give distinct non-negative integers, e.g. 0,1,2.")
    from bench.pipeline.executors import EXECUTORS

    if cfg.executor not in EXECUTORS:
        raise UserError(f"--executor {cfg.executor!r}: use one of {', '.join(EXECUTORS)}.")
    if cfg.executor == "dask" and not cfg.scheduler:
        raise UserError("--executor dask needs --scheduler tcp://HOST:PORT (the address `dask scheduler` prints).")
    if cfg.workers < 1 or cfg.retries < 0:
        raise UserError(f"--workers {cfg.workers} / --retries {cfg.retries}: workers must be >= 1, retries >= 0.")
    if cfg.timing_batch < 1:
        raise UserError(f"--timing-batch {cfg.timing_batch}: give a positive batch size.")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads {cfg.threads}: give a positive number of threads.")
    if cfg.backbone and cfg.backbone != "msdnet" and not cfg.backbone.startswith("vit_"):
        raise UserError(f"--backbone {cfg.backbone!r}: use msdnet or a timm Vision Transformer (vit_*), whose "
                        "per-block exits this harness uses; `python -m bench ls` lists them.")
    if cfg.pretrained and cfg.backbone_kind == "msdnet":
        raise UserError("--pretrained loads timm weights for a ViT; MSDNet (--backbone msdnet) trains from scratch. "
                        "Drop one of the two.")
    for m in cfg.methods:
        create_method(m, cfg.method_overrides(m))  # unknown fields fail here
    for kind in cfg.kinds():  # inconsistent sizes fail here, before any training
        bcfg = cfg.backbone_config(kind)
        if kind != "vit":
            MSDNet(bcfg, in_chans=1, num_classes=2)
            continue
        if cfg.backbone:
            import timm

            if not timm.is_model(bcfg.model):
                raise UserError(unknown_name_message("backbone", bcfg.model, timm.list_models("vit_*")))
        create_backbone(bcfg, in_chans=1, num_classes=2, load_weights=False)


def prepare_out(cfg: RunConfig) -> Path:
    out = Path(cfg.out) if cfg.out else Path("results") / "runs" / cfg.run_id
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path.")
    run_json = out / "run.json"
    if run_json.exists():
        try:
            other = json.loads(run_json.read_text()).get("run_id")
        except ValueError:
            other = None
        if other != cfg.run_id:
            raise UserError(f"--out {out} holds a run of another configuration (run_id {other}, this one is "
                            f"{cfg.run_id}); its results are left untouched. Choose another --out, or drop --out "
                            "to use results/runs/<run_id>/.")
    elif out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise UserError(f"--out {out} is not empty and holds no run.json: refusing to mix results with other "
                        "files. Choose an empty or new directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not run_json.exists():  # claim the directory for this configuration before the long work starts
            write_json(run_json, {"run_id": cfg.run_id, "status": "running"})
    except OSError as e:
        raise UserError(f"Cannot write to --out {out}: {e.strerror or e}. Choose a writable directory.") from None
    return out


def build_task(dataset, splits, backbone, feats: dict[str, torch.Tensor], macs, kind: str = "vit") -> Task:
    parts = {}
    for name in ("train", "val", "cal"):
        idx = splits[name]
        parts[name] = SplitData(feats["train"][:, torch.from_numpy(idx)], dataset.train_y[idx], idx)
    parts["test"] = SplitData(feats["test"], dataset.test_y, splits.test)
    weight, bias = head_params(backbone.model)
    return Task(dataset.name, splits.seed, dataset.num_classes, parts, weight, bias, macs, key=backbone.key,
                split_sha256=splits.sha256, backbone=kind, exit_heads=exit_head_params(backbone.model))


def describe_backbone(c: "BackboneConfig | MSDNetConfig") -> str:
    if isinstance(c, MSDNetConfig):
        boosted = ",boosted" if c.training == "boosted" else ""
        return f"msdnet(img{c.img_size},b{c.n_blocks},c{c.channels},g{c.growth_rate}{boosted})"
    if c.pretrained:
        return f"{c.model}(pretrained,img{c.img_size})"
    return f"{c.model}(img{c.img_size},p{c.patch_size},d{c.embed_dim},L{c.depth})"


def count_macs(model) -> ViTMacs:
    """Per-block MACs from fvcore (attention included), checked against the analytic count (the arbiter).
    MSDNet: fvcore on every part (bench.backbones.msdnet.msdnet_macs), each classifier's convs as its exit's feature."""
    if isinstance(model, MSDNet):
        m = msdnet_macs(model)
        return ViTMacs(embed=m.stem, blocks=m.blocks, head=m.classifier_features[-1] + m.classifier_linear[-1],
                       exit_features=m.classifier_features[:-1])
    counted, analytic = fvcore_vit_macs(model), analytic_vit_macs(model)
    if abs(counted.static - analytic.static) > 0.01 * analytic.static:
        raise RuntimeError(f"fvcore ({counted.static}) and analytic ({analytic.static}) MACs differ by > 1 %")
    return counted


def timing_rows(method, task: Task, points, cfg: RunConfig, backbone, dataset) -> list[dict]:
    """Wall-clock of the real early-exit runner on test images per budget (see bench.pipeline.runner), with the
    static backbone timed on the same device, batch and inputs as the denominator."""
    from bench.pipeline.runner import timing_metrics

    rows = []
    device = (torch.cuda.get_device_name(0) if cfg.device.startswith("cuda")
              else platform.processor() or platform.machine())
    for budget, point in zip(cfg.budgets, points):
        if point is None:
            continue
        values = timing_metrics(backbone.model, method, point, dataset.test_x, backbone.config.img_size,
                                cfg.device, cfg.timing_batch)
        params = {**method.params(), **point.params, "val_macs_rel": point.val_macs_rel,
                  "device": device, "torch": torch.__version__, "timing_batch": cfg.timing_batch}
        rows += [metric_row("test", task.seed, method.name, params, budget, m, v, cfg.timing_batch)
                 for m, v in values.items()]
    return rows


def seed_artefacts(cfg: RunConfig, dataset, seed: int, cache: Path, kind: str | None = None):
    """Split, backbone (of ``kind``, default the run's) and features of one seed (built once, then served from
    the cache) and its Task."""
    kind = kind or cfg.backbone_kind
    splits = load_or_make_splits(cache, dataset.name, dataset.train_y, len(dataset.test_y), seed)
    backbone = load_or_train_backbone(cache, cfg.backbone_config(kind), dataset, splits, cfg.device)
    feats = load_or_compute_features(cache, backbone, dataset, cfg.device)
    task = build_task(dataset, splits, backbone, feats, count_macs(backbone.model.cpu()), kind)
    return splits, backbone, task


def static_job(kind: str) -> str:
    """Job name of a network's static rows: ``static`` for the ViT, ``static@msdnet`` for MSDNet."""
    return "static" if kind == "vit" else f"static@{kind}"


_PROCESS_MEMO: dict = {}  # the last seed's dataset and tasks (one per network), so in-process jobs load them once


def run_job(cfg: RunConfig, seed: int, method_name: str) -> dict:
    """One job of a sweep: fit one method on one seed's cached features and evaluate every budget. Pure given
    the cache (built beforehand by ``execute``), so any executor may run it, and rerun it after a fault.
    Returns {"rows": metric rows, "decisions": decision blocks}, every row tagged with its backbone;
    ``method_name`` ``static`` / ``static@msdnet`` gives a static backbone's rows."""
    import methods  # noqa: F401  (a fresh worker process registers the methods)
    from datasets import load_dataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if method_name.startswith("static"):
        kind = method_name.partition("@")[2] or "vit"
    else:
        kind = cfg.method_kind(method_name)
    key = (cfg.dataset, cfg.data_dir, str(cache), seed)
    if _PROCESS_MEMO.get("key") != key:
        _PROCESS_MEMO.clear()
        _PROCESS_MEMO.update(key=key, dataset=load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=False),
                             artefacts={})
    dataset, memo = _PROCESS_MEMO["dataset"], _PROCESS_MEMO["artefacts"]
    bkey = config_hash(dataclasses.asdict(cfg.backbone_config(kind)))
    if bkey not in memo:
        memo[bkey] = seed_artefacts(cfg, dataset, seed, cache, kind)
    _, backbone, task = memo[bkey]
    described = describe_backbone(backbone.config)
    if method_name.startswith("static"):
        return {"rows": [{**r, "backbone": described} for r in static_backbone_rows(task)], "decisions": []}
    method = create_method(method_name, cfg.method_overrides(method_name)).fit(task)
    points = method.calibrate(task, cfg.budgets)
    rows, decisions = evaluate_method(method, task, points, cfg.budgets)
    if cfg.timing and not method.bound:
        rows += timing_rows(method, task, points, cfg, backbone, dataset)
    return {"rows": [{**r, "backbone": described} for r in rows], "decisions": decisions}


def execute(cfg: RunConfig, log=print) -> Path:
    """Run the whole job; returns the output directory. Raises UserError for user mistakes.

    A run is a sweep of independent jobs (seed x method, plus the static backbone per seed). Shared artefacts
    (splits, backbones, features) are built first, in this process, seed by seed; then the jobs run on the
    chosen executor and each writes its result file atomically under ``OUT/jobs/``; the tables are assembled
    from those files. Rerunning the same command with the same ``--out`` skips finished jobs."""
    from bench.pipeline.executors import run_jobs

    validate(cfg)
    from datasets import load_dataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = prepare_out(cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    t0 = time.time()
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download)
    log(f"dataset {dataset.name}: {len(dataset.train_y)} train / {len(dataset.test_y)} test images, "
        f"{dataset.num_classes} classes (files and checksums in run.json)")
    bcfg = cfg.backbone_config()
    seeds_info = {}
    for seed in cfg.seeds:
        for kind in cfg.kinds():
            torch.manual_seed(seed)
            splits, backbone, task = seed_artefacts(cfg, dataset, seed, cache, kind)
            info = {"backbone_key": backbone.key, "backbone_val_accuracy": backbone.val_accuracy,
                    "backbone_best_epoch": backbone.best_epoch,
                    "backbone_train_seconds": (backbone.history[-1].get("seconds") if backbone.history else None),
                    "static_macs": task.macs.static}
            if kind == cfg.backbone_kind:
                seeds_info[seed] = {"split_sha256": splits.sha256, **info,
                                    "split_sizes": {k: int(len(splits[k])) for k in ("train", "val", "cal", "test")}}
            else:
                seeds_info[seed].setdefault("other_backbones", {})[kind] = info
    jobs = [(seed, name) for seed in cfg.seeds
            for name in [*(static_job(k) for k in cfg.static_kinds()), *cfg.methods]]
    try:
        results = run_jobs(cfg, jobs, out / "jobs", log)  # JobFailures (exit 1) names the failed jobs
        rows = [r for job in jobs for r in results[job]["rows"]]
        decisions = [d for job in jobs for d in results[job]["decisions"]]
        df = metrics_frame(rows, cfg.run_id, dataset.name, describe_backbone(bcfg),
                           {seed: info["split_sha256"] for seed, info in seeds_info.items()})
        summary = summary_table(df)
        write_csv(decisions_frame(decisions), out / "decisions.csv.gz")
        write_csv(df, out / "metrics.csv")
        atomic_write_text(out / "summary.md", summary + "\n")
        config = {**dataclasses.asdict(cfg), "resolved_backbone": dataclasses.asdict(bcfg)}
        write_json(out / "run.json", {"run_id": cfg.run_id, "status": "complete", **provenance(config, {
            "dataset_source": dataset.source, "seeds": seeds_info, "duration_s": round(time.time() - t0, 2)})})
    except OSError as e:  # full disk, read-only or vanished --out: every file is replaced atomically
        raise UserError(f"Could not write the results to {out} ({e.strerror or e}). Files written before are "
                        "intact (each is replaced atomically) and finished jobs are kept in its jobs/ folder: free "
                        "space or fix the directory, then rerun the same command to resume.") from None
    log("\n" + summary + "\n")
    log(f"results written to {out}/ (metrics.csv, decisions.csv.gz, run.json, summary.md)")
    return out
