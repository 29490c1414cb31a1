"""Result files of a run, written atomically (a reader never sees a half-written table):
``metrics.csv`` (tidy long rows), ``decisions.csv.gz`` (one row per sample x budget), ``run.json``
(provenance) and ``summary.md`` (the printed table, generated from the rows)."""
from __future__ import annotations

import gzip
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from bench.base.hashing import atomic_write, atomic_write_text

METRIC_COLUMNS = ["run_id", "dataset", "split", "seed", "backbone", "method", "params", "budget", "metric",
                  "value", "n", "exit", "split_sha256"]
DECISION_COLUMNS = ["split", "seed", "method", "budget", "params", "sample_id", "exit", "pred", "target",
                    "confidence"]


def metrics_frame(rows: list[dict], run_id: str, dataset: str, backbone: str,
                  split_sha256: dict[int, str]) -> pd.DataFrame:
    """The tidy table; ``split_sha256`` maps each seed to the hash of its splits, recorded on every row.
    ``backbone`` fills the rows that do not name their own (a run's methods may run on different networks)."""
    df = pd.DataFrame(rows)
    df["split_sha256"] = df["seed"].map(split_sha256)
    df.insert(0, "run_id", run_id)
    df.insert(1, "dataset", dataset)
    own = df.pop("backbone") if "backbone" in df else pd.Series(None, index=df.index, dtype=object)
    df.insert(4, "backbone", own.fillna(backbone))
    df["exit"] = df["exit"].astype("Int64")
    return df[METRIC_COLUMNS]


def decisions_frame(block: dict) -> pd.DataFrame:
    """One decision block (a split and operating point: per-sample arrays, the rest scalars) as rows."""
    n = len(block["sample_id"])
    return pd.DataFrame({c: (block[c] if np.ndim(block[c]) else np.repeat(block[c], n)) for c in DECISION_COLUMNS})


FLOAT_FORMAT = "%.17g"  # keeps float64 exact, so accuracy and ECE can be recomputed from the files to 1e-6 and beyond


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format=FLOAT_FORMAT,
                                             compression="gzip" if str(path).endswith(".gz") else None))


def write_decisions(blocks: Iterable[dict], path: Path) -> None:
    """``decisions.csv.gz``: a header, then each block's rows, written block by block into one gzip stream, so
    only one block's rows are ever a table in memory (one frame of 22 points x 25,000 samples, a 100,000-image
    run's, took 280 MiB). The gzip header holds no time or file name: the same decisions give the same bytes."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                io.TextIOWrapper(gz, encoding="utf-8", newline="") as text:
            wrote = False
            for block in blocks:
                decisions_frame(block).to_csv(text, header=not wrote, index=False, float_format=FLOAT_FORMAT)
                wrote = True
            if not wrote:
                pd.DataFrame(columns=DECISION_COLUMNS).to_csv(text, index=False)

    atomic_write(path, write)


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "metrics.csv", dtype={"exit": "Int64"})


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again: ``python -m bench run ...`` rather than the path of
    ``bench/__main__.py`` that ``sys.argv[0]`` holds; arguments shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = Path(argv[0])
    prog = ("python -m bench" if argv[0] == "python -m bench" or (head.name == "__main__.py"
                                                                 and head.parent.name == "bench")
            else "bench" if head.name == "bench" else shlex.quote(argv[0]))
    return " ".join([prog, *map(shlex.quote, argv[1:])])


def machine() -> dict:
    """What ran the job, without the host name: CPU model, logical cores, memory, GPUs (empty list: none)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "memory_gib": memory, "gpus": gpus, "threads": torch.get_num_threads(), "platform": platform.platform()}


def source_state() -> dict:
    """The code's git commit and whether the tree had uncommitted changes. A run takes it when it starts: the code
    it imported is the code of that moment, whatever is committed while it runs."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_sha": git("rev-parse", "HEAD") or "unknown", "git_dirty": bool(git("status", "--porcelain"))}


def provenance(config: dict, extra: dict, argv: list[str] | None = None) -> dict:
    """Where the numbers come from; ``argv`` (default ``sys.argv``) is the command that produced them. ``extra``
    wins over the fields computed here (a run passes the ``source_state`` it took at its start)."""
    import timm
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                "numpy": np.__version__, "pandas": pd.__version__}
    try:
        from importlib.metadata import version

        versions["fvcore"] = version("fvcore")
    except Exception:
        pass
    device = machine()
    if device["gpus"]:
        device["cuda"] = device["gpus"][0]
    return {**source_state(), "versions": versions, "device": device, "command": command_line(argv),
            "argv": list(sys.argv if argv is None else argv)[1:],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config, **extra}


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
