"""The device check's markdown (``gpu-check.md``): the same figures as ``gpu-check.json``, as tables."""
from __future__ import annotations

import math

from bench.gpu_check.common import TARGET_RATIO


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_f(c) for c in r) + " |" for r in rows)]


def _verdict(row: dict, on_cuda: bool) -> str:
    if row.get("meets_target") is None:
        return "— (CPU: target is for CUDA)" if not on_cuda else "—"
    return "pass" if row["meets_target"] else "FAIL"


def _early_exit(e: dict, on_cuda: bool) -> list[str]:
    b = e["timing_batch"]
    lines = [f"## 3. Real early exit, wall_rel against macs_rel (budget {_f(e['budget'], 2)}, batch {b} and batch 1)",
             "", f"Target: {e['target']}. Status: {e.get('targets', {}).get('status', '—')}.", ""]
    for key, v in e.get("backbones", {}).items():
        st = v["static"]
        reduced = (" (dry run: the same timm model, reduced)" if v["reduced_for_dry_run"] and key == "vit_s16_224"
                   else "")
        lines += [f"### {'ViT-S/16-224' if key == 'vit_s16_224' else 'CIFAR-size ViT'}: {v['backbone']}{reduced}", "",
                  f"{v['timm_model']} at {v['img_size']} px, {v['weights']}; {v['dtype']}; MACs by "
                  f"{v['macs_counter']} ({_f(float(v['static_macs']) / 1e6, 1)} M per image); heads fitted on "
                  f"{v['fit_images']} synthetic images, {v['test_images']} timed. Static backbone: "
                  f"{_f(st['throughput'])} img/s at batch {b} (n={st['n']}), {_f(st['throughput_b1'])} img/s at "
                  f"batch 1, latency p50 {_f(st['latency_ms'], 2)} ms / p90 {_f(st['latency_ms_p90'], 2)} ms.", ""]
        rows = []
        for name, r in v["methods"].items():
            if "error" in r:
                rows.append([name, r["error"], *[None] * 10])
                continue
            rows.append([name, r["budget_used"], r["macs_rel"], r["wall_rel"], r["wall_over_macs"],
                         _verdict(r, on_cuda) if key == "vit_s16_224" else "—", r["throughput"],
                         r["host_syncs_per_block"], r["wall_rel_b1"], r["latency_ms"], r["latency_ms_p90"],
                         r["host_syncs_per_block_b1"]])
        lines += _table(["method", "budget", "macs_rel", f"wall_rel b{b}", "wall / macs",
                         f"≤ {TARGET_RATIO:g} × macs_rel", f"img/s b{b}", f"host syncs / block b{b}",
                         "wall_rel b1", "latency p50 ms", "latency p90 ms", "host syncs / block b1"], rows) + [""]
    if e.get("errors"):
        lines += [f"Errors: {'; '.join(f'{k}: {v}' for k, v in e['errors'].items())}.", ""]
    return lines


def markdown(report: dict) -> str:
    s = report["sections"]
    est = report.get("estimate_s", {})
    on_cuda = str(report["device"]).startswith("cuda")
    lines = [f"# Device check on {report['device_name']}{' (dry run)' if report['dry'] else ''}", "",
             f"`{report['command']}` · device {report['device']} · torch {report['torch']} · "
             f"{report['date']} · {report['total_seconds']:.0f} s (estimate {sum(est.values()):.0f} s on "
             f"{report.get('estimate_for', '—')}) · git {report['git_sha'][:12]}", "",
             f"Interpreter `{report.get('python_executable', '—')}` (Python {report['python']}); MACs counter: "
             f"{report.get('macs_counter', '—')} (fvcore {report.get('fvcore') or 'not importable'}).", "",
             "| section | status | seconds | estimate s | note |", "|---|---|---|---|---|",
             *(f"| {k} | {v['status']} | {v['seconds']:.0f} | {_f(est.get(k), 0)} | "
               f"{v.get('error') or v.get('note') or ''} |" for k, v in s.items()), ""]
    if report["not_reached"]:
        lines += [f"Not reached (the check stopped before them): {', '.join(report['not_reached'])}.", ""]
    t = s.get("cuda_tests", {})
    if "cases" in t:
        lines += ["## 1. CUDA tests and the real runner against the simulation", "",
                  f"pytest: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped "
                  f"(`{t['command']}`).", ""]
        lines += _table(["test", "outcome", "s"], [[c["test"], c["outcome"], c["seconds"]] for c in t["cases"]]) + [""]
    r = s.get("runner_vs_simulation", {})
    if "methods" in r:
        lines += [f"Real runner on {report['device']} against the simulation from the feature cache ({r['backbone']}, "
                  f"{r['dataset']}, {r['test_images']} test images per point): {r['exit_mismatches']} exit "
                  f"mismatches and {r['prediction_flips']} prediction flips over {r['points']} points.", ""]
        lines += _table(["method", "points", "exit mismatches", "prediction flips", "max |Δlogit|",
                         "block rows equal"],
                        [[m["method"], m["points"], m["exit_mismatches"], m["prediction_flips"],
                          f"{m['max_logit_diff']:.2e}", m["block_rows_equal"]] for m in r["methods"]]) + [""]
    t = s.get("throughput", {})
    if "vit_cifar" in t:
        lines += ["## 2. Training and feature-extraction throughput (images/s, synthetic inputs)", ""]
        lines += _table(["backbone", "timm model", "px", "train batch", "train img/s", "train dtype",
                         "features img/s", "features dtype"],
                        [[v["backbone"], v["timm_model"], v["img_size"], v["batch_size"], v["train_images_per_s"],
                          v["train_dtype"], v["feature_images_per_s"], v["feature_dtype"]]
                         for v in (t["vit_s16_224"], t["vit_cifar"])]) + [""]
        comp = t.get("vit_s16_224_compiled")
        lines += ([f"`--compile` (ViT-S/16, torch.compile'd training step): {_f(comp['train_images_per_s'])} img/s, "
                   f"{comp['speedup']:.2f}x eager; first epoch {comp['first_epoch_s']:.0f} s (compiling) against "
                   f"{comp['eager_first_epoch_s']:.0f} s eager.", ""] if comp else
                  ["`--compile`: not measured in this check (the dry run skips it: minutes of compiling on a CPU).", ""])
    e = s.get("early_exit_timing", {})
    if e.get("backbones"):
        lines += _early_exit(e, on_cuda)
    c = s.get("cifar10_from_scratch")
    if c is None:
        return "\n".join(lines)
    lines += ["## 4. From scratch on the CIFAR-10 photographs", ""]
    if c["status"] == "ok":
        lines += [f"```bash\n{c['command']}\n```", "",
                  f"{c['backbone']}, {c['epochs']} epochs ({c['epochs_rule']}): backbone val accuracy "
                  f"{_f(c['backbone_val_accuracy'], 4)}, trained in {_f(c['backbone_train_seconds'], 0)} s; the whole "
                  f"run {c['run_seconds']:.0f} s. Report: `{c['report']}`.", "", c["summary_md"], ""]
        if c.get("timing_md"):
            lines += [c["timing_md"], ""]
    else:
        lines += [c.get("note") or c.get("error", ""), ""]
    return "\n".join(lines)
