"""A run's configuration, checked up front: every name, every ``--set`` field (typed and range-checked, lists
are lists), every network's configuration, before any data is read or backbone built. A mistake is a
UserError (exit 2) naming the field, the value and what is allowed.

``--set`` targets: ``METHOD.FIELD`` (a method's hyper-parameter), ``backbone.FIELD`` (the run's backbone,
``--backbone``), ``backbone.NAME.FIELD`` (any network of the run by its backbone name, e.g. the MSDNet the
``msdnet`` method brings to a ViT run). ``backbone.FIELD`` also sets the field of a variant of the run's backbone
(a subclass of its plugin: BoostedNet's MSDNet on an MSDNet run). A method field that is also a field of the network the method brings
(BoostedNet's ``boost_weight``) configures both.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import methods  # noqa: F401  (registers the methods in every process that reads a config: pool and Dask workers)
from bench.backbones.base import BACKBONES, Backbone, resolve_backbone
from bench.base.errors import UserError
from bench.base.hashing import config_hash
from bench.base.registry import unknown_name_message
from bench.core.interface import METHODS, create_method
from bench.pipeline.executors import EXECUTORS
from bench.pipeline.risk_points import RiskSpec, check_spec
from bench.pipeline.timing import TIMING_DTYPES
from datasets import list_datasets

DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_BACKBONE = "vit"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; any other value as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_cache_dir() -> Path:
    base = os.environ.get("BENCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bench")
    return Path(base)


@dataclass
class RunConfig:
    methods: list[str]
    dataset: str = "digits"
    backbone: str | None = None  # a registered backbone (vit, msdnet) or a timm ViT name; None: vit
    seeds: list[int] = field(default_factory=lambda: [0])
    budgets: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    # {"threshold": {"epochs": 5}, "backbone": {"depth": 4, "msdnet.epochs": 2}}: from --set TARGET.FIELD=VALUE
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    pretrained: bool | str = False  # True: timm's hub weights; a path: a local checkpoint (--pretrained PATH)
    device: str = "auto"  # auto: CUDA when torch sees one, else CPU (resolved before the run id is computed)
    threads: int | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    out: str | None = None
    download: bool = True
    timing: bool = False  # time real early exit on test (latency, throughput, wall_rel) per budget
    timing_batch: int = 256
    timing_dtype: str = "fp32"  # fp32 | bf16: the timed passes in plain fp32 or under bfloat16 autocast
    compile: bool = False  # train backbones with torch.compile'd steps (--compile; joins the backbone cache key)
    executor: str = "sequential"  # sequential | local (process pool) | dask
    workers: int = 2  # local executor's processes
    scheduler: str | None = None  # dask scheduler address, tcp://HOST:PORT
    retries: int = 1  # extra attempts for a failed job before the run reports it
    argv: list[str] | None = None  # the command line that made this config (recorded in run.json)
    # risk-controlled points of score rules (--risk, --delta, --risk-method, --risk-loss): empty risk, none
    risk: list[float] = field(default_factory=list)
    risk_delta: float = 0.1
    risk_methods: list[str] = field(default_factory=lambda: ["ucb"])
    risk_loss: str = "disagreement"

    def risk_spec(self) -> RiskSpec | None:
        if not self.risk:
            return None
        return RiskSpec(tuple(self.risk), self.risk_delta, tuple(self.risk_methods), self.risk_loss)

    # -- networks ---------------------------------------------------------------------------------------------
    @property
    def run_backbone(self) -> str:
        """The registered backbone ``--backbone`` names."""
        return resolve_backbone(self.backbone or DEFAULT_BACKBONE)[0]

    def method_backbone(self, method: str) -> str:
        """The backbone a method's jobs run on."""
        return METHODS.get(method).backbone_for(self.run_backbone)

    def networks(self) -> list[str]:
        """Every backbone this run trains, the run's own first."""
        return list(dict.fromkeys([self.run_backbone, *(self.method_backbone(m) for m in self.methods)]))

    def static_networks(self) -> list[str]:
        """The networks whose static rows are written."""
        return [n for n in self.networks() if BACKBONES.get(n).static_rows]

    def plugin(self, network: str | None = None) -> type[Backbone]:
        return BACKBONES.get(network or self.run_backbone)

    def backbone_changes(self, network: str) -> dict[str, Any]:
        """The config changes of one network: from ``--backbone NAME``, ``--pretrained``, ``--set backbone.FIELD``
        (the run's backbone), ``--set backbone.NETWORK.FIELD``, and method fields shared with the network."""
        plugin = BACKBONES.get(network)
        fields = {f.name for f in dataclasses.fields(plugin.Config)}
        changes: dict[str, Any] = {}
        given = self.overrides.get("backbone", {})
        # a variant of the run's backbone (BoostedNet's MSDNet on an MSDNet run, SDN's ViT on a ViT run) shares its
        # architecture and weights: --backbone NAME, --pretrained and --set backbone.FIELD apply to it too
        variant = issubclass(plugin, self.plugin()) and network != self.run_backbone
        if network == self.run_backbone or variant:
            changes.update(resolve_backbone(self.backbone or DEFAULT_BACKBONE)[1])
            if self.pretrained:
                if "pretrained" not in fields:
                    raise UserError(f"--pretrained: backbone {network!r} has no pretrained weights (it trains from "
                                    "scratch). Drop --pretrained or choose a timm ViT with --backbone.")
                changes["pretrained"] = True
                if isinstance(self.pretrained, str):
                    changes["weights_file"] = self.pretrained
            changes.update({k: v for k, v in given.items() if "." not in k})
        changes.update({k.partition(".")[2]: v for k, v in given.items() if k.partition(".")[0] == network})
        for m in self.methods:  # a method field that is also a field of the network it brings sets both
            if self.method_backbone(m) != network or network == self.run_backbone:
                continue
            for name, value in self.overrides.get(m, {}).items():
                if name in fields:
                    if name in changes and changes[name] != value:
                        raise UserError(f"--set {m}.{name}={value} disagrees with the {network} network's "
                                        f"{name}={changes[name]}; {m} combines that network's exits, so set it once.")
                    changes[name] = value
        return changes

    def backbone_config(self, network: str | None = None):
        network = network or self.run_backbone
        owner = "backbone" if network == self.run_backbone else f"backbone.{network}"
        return BACKBONES.get(network).configure(self.dataset, self.backbone_changes(network), owner)

    def method_overrides(self, method: str) -> dict[str, Any]:
        """``--set METHOD.FIELD`` values that are the method's own fields (a field the method shares with the
        network it brings is also the network's, see ``backbone_changes``)."""
        return dict(self.overrides.get(method, {}))

    def identity(self) -> dict:
        """What determines the numbers (not where files live, nor the thread count)."""
        return {"methods": self.methods, "dataset": self.dataset, "seeds": self.seeds, "budgets": self.budgets,
                "backbones": {n: dataclasses.asdict(self.backbone_config(n)) for n in self.networks()},
                "method_params": {m: create_method(m, self.method_overrides(m)).params() for m in self.methods},
                "device": self.device,
                # only when not the default, so the run ids of fp32 runs stay what they were
                **({"timing_dtype": self.timing_dtype} if self.timing_dtype != "fp32" else {}),
                **({"compile": True} if self.compile else {}),
                **({"risk": {"epsilons": self.risk, "delta": self.risk_delta, "procedures": self.risk_methods,
                             "loss": self.risk_loss}} if self.risk else {})}

    @property
    def run_id(self) -> str:
        return config_hash(self.identity(), 12)


def validate(cfg: RunConfig) -> None:
    """Check every user input before any expensive work starts."""
    if not cfg.methods:
        raise UserError("No methods given: pass --methods, e.g. --methods threshold,entropy.")
    for m in cfg.methods:
        METHODS.get(m)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise UserError(f"--methods lists a method twice: {','.join(cfg.methods)}.")
    if cfg.dataset not in list_datasets():
        raise UserError(unknown_name_message("dataset", cfg.dataset, list_datasets()))
    resolve_backbone(cfg.backbone or DEFAULT_BACKBONE)  # unknown names: "did you mean"
    networks = cfg.networks()
    for key, values in cfg.overrides.items():
        if key == "backbone":
            for name in values:
                if "." in name and name.partition(".")[0] not in networks:
                    raise UserError(f"--set backbone.{name}: {name.partition('.')[0]!r} is not a network of this "
                                    f"run ({', '.join(networks)}).")
        elif key not in cfg.methods:
            raise UserError(f"--set {key}.FIELD=...: {key!r} is neither 'backbone' nor one of the methods of "
                            f"this run ({', '.join(cfg.methods)}).")
    for b in cfg.budgets:
        if not (0 < b <= 1) or not np.isfinite(b):
            raise UserError(f"Budget {b} is outside (0, 1]: a budget is a target mean cost relative to the "
                            "static backbone, e.g. --budgets 0.25,0.5,0.75,1.0.")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device {cfg.device!r}: use auto, cpu or cuda.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device here; use --device cpu.")
    if any(seed < 0 for seed in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds {','.join(map(str, cfg.seeds))}: give distinct non-negative integers, e.g. 0,1,2.")
    if cfg.executor not in EXECUTORS:
        raise UserError(f"--executor {cfg.executor!r}: use one of {', '.join(EXECUTORS)}.")
    if cfg.executor == "dask" and not cfg.scheduler:
        raise UserError("--executor dask needs --scheduler tcp://HOST:PORT (the address `dask scheduler` prints).")
    if cfg.workers < 1 or cfg.retries < 0:
        raise UserError(f"--workers {cfg.workers} / --retries {cfg.retries}: workers must be >= 1, retries >= 0.")
    if cfg.timing_batch < 1:
        raise UserError(f"--timing-batch {cfg.timing_batch}: give a positive batch size.")
    if cfg.timing_dtype not in TIMING_DTYPES:
        raise UserError(f"--timing-dtype {cfg.timing_dtype!r}: use fp32 (plain float32) or bf16 (the timed passes "
                        "under bfloat16 autocast).")
    if cfg.timing_dtype != "fp32" and not cfg.timing:
        raise UserError(f"--timing-dtype {cfg.timing_dtype} sets the dtype of the timed passes: add --timing, or "
                        "drop --timing-dtype.")
    if (cfg.timing and cfg.timing_dtype == "bf16" and cfg.device.startswith("cuda") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise UserError(f"--timing-dtype bf16: {torch.cuda.get_device_name(torch.device(cfg.device))} has no "
                        "bfloat16 support; use --timing-dtype fp32.")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads {cfg.threads}: give a positive number of threads.")
    if cfg.risk:
        check_spec(cfg.risk_spec(), cfg.methods)
    elif not cfg.budgets:
        raise UserError("Nothing to evaluate: give --budgets (target costs) or --risk (risk levels), or both.")
    for m in cfg.methods:
        create_method(m, cfg.method_overrides(m))  # unknown fields, wrong types and ranges fail here
    for network in networks:  # field types, ranges and inconsistent sizes fail here, before any training
        cfg.backbone_config(network)
