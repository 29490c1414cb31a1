"""Result files of a run, written atomically (a reader never sees a half-written table):
``metrics.csv`` (tidy long rows), ``decisions.csv.gz`` (one row per sample x budget), ``run.json``
(provenance) and ``summary.md`` (the printed table, generated from the rows)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.base.hashing import atomic_write, atomic_write_text

METRIC_COLUMNS = ["run_id", "dataset", "split", "seed", "backbone", "method", "params", "budget", "metric",
                  "value", "n", "exit", "split_sha256"]
DECISION_COLUMNS = ["split", "seed", "method", "budget", "sample_id", "exit", "pred", "target", "confidence"]


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


def decisions_frame(blocks: list[dict]) -> pd.DataFrame:
    frames = []
    for b in blocks:
        n = len(b["sample_id"])
        frames.append(pd.DataFrame({c: (b[c] if np.ndim(b[c]) else np.repeat(b[c], n)) for c in DECISION_COLUMNS}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DECISION_COLUMNS)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    # %.17g keeps float64 exact, so accuracy and ECE can be recomputed from the files to 1e-6 and beyond
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.17g",
                                             compression="gzip" if str(path).endswith(".gz") else None))


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "metrics.csv", dtype={"exit": "Int64"})


def provenance(config: dict, extra: dict) -> dict:
    import timm
    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                "numpy": np.__version__, "pandas": pd.__version__}
    try:
        from importlib.metadata import version

        versions["fvcore"] = version("fvcore")
    except Exception:
        pass
    device = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "platform": platform.platform()}
    if torch.cuda.is_available():
        device["cuda"] = torch.cuda.get_device_name(0)
    return {"git_sha": git("rev-parse", "HEAD") or "unknown", "git_dirty": bool(git("status", "--porcelain")),
            "versions": versions, "device": device, "command": " ".join(sys.argv), "config": config, **extra}


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
