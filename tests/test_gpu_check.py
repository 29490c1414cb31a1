"""The device check (``python -m bench.gpu_check``): its dry run goes through every section end to end on the
CPU at tiny sizes and writes one JSON and one markdown file of real figures; a failing section is recorded
while the others still run, and the exit status says so."""
from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check
from bench.pipeline.runner import CPU_LOGIT_TOLERANCE


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    rc = gpu_check.main(["--dry", "--out", str(out)])
    return rc, out, json.loads((out / "gpu-check.json").read_text())


def test_the_dry_run_passes_every_section_with_real_figures(dry):
    rc, out, report = dry
    s = report["sections"]
    assert rc == 0 and report["failed"] == [] and report["dry"] and report["device"] == "cpu"
    assert list(s) == [name for name, _ in gpu_check.SECTIONS]
    assert {v["status"] for v in s.values()} == {"ok"} and all(v["seconds"] >= 0 for v in s.values())
    # 1. the CUDA tests ran (and skipped: no GPU here), and the real runner equals the simulation (to float32 rounding)
    t = s["cuda_tests"]
    assert t["exit_code"] == 0 and t["failed"] == t["error"] == 0 and len(t["cases"]) >= len(gpu_check.CUDA_TESTS)
    assert t["skipped"] == len(t["cases"]) if not torch.cuda.is_available() else t["passed"] > 0
    r = s["runner_vs_simulation"]
    assert {m["method"] for m in r["methods"]} >= {"threshold", "patience", "jeidnn", "jeidnn_consistent"}
    assert r["points"] >= 7 and r["exit_mismatches"] == r["prediction_flips"] == 0
    assert r["max_logit_diff"] < CPU_LOGIT_TOLERANCE
    assert all(m["block_rows_equal"] and m["points"] >= 1 for m in r["methods"])
    # 2. throughputs, with the dtype they were measured in
    for key in ("vit_s16_224", "vit_cifar"):
        v = s["throughput"][key]
        assert v["train_images_per_s"] > 0 and v["feature_images_per_s"] > 0 and v["train_dtype"] == "float32"
        assert v["timed_epochs"] == 2
    assert s["throughput"]["vit_s16_224"]["timm_model"] == "vit_small_patch16_224"
    # 3. real early exit: wall_rel at the timing batch and at batch 1 beside the realised cost
    e = s["early_exit_timing"]
    assert e["static"]["throughput_b64"] > 0 and 0 < e["static"]["latency_ms"] <= e["static"]["latency_ms_p90"]
    assert "threshold" in {p["method"] for p in e["points"]}
    for p in e["points"]:
        assert 0 < p["macs_rel"] <= 1.1 and p["wall_rel_b64"] > 0 and p["wall_rel_b1"] > 0
        assert p["throughput_b64"] > 0 and p["n_b64"] == 128 and p["n_b1"] == 8 and p["n_latency"] == 4
    # 4. the bench run on a generated image folder, then its report
    c = s["cifar10_from_scratch"]
    rows = {(row["method"], row["budget"]): row for row in c["rows"]}
    assert 0 <= rows[("static", None)]["accuracy"] <= 1 and rows[("static", None)]["throughput"] > 0
    assert rows[("threshold", 0.5)]["wall_rel"] > 0 and 0 < rows[("threshold", 0.5)]["macs_rel"] <= 1.1
    assert (out / "run" / "report" / "report.md").read_text().count("Latency and throughput") == 1
    assert "| static backbone |" in c["timing_md"]


def test_the_markdown_names_the_device_and_holds_the_figures(dry):
    _, out, report = dry
    md = (out / "gpu-check.md").read_text()
    assert md.startswith(f"# Device check on {report['device_name']} (dry run)") and "CPU" in report["device_name"]
    for heading in ("## 1. CUDA tests", "## 2. Training and feature-extraction throughput", "## 3. Real early exit",
                    "## 4. From scratch"):
        assert heading in md
    assert "| threshold | device |" in md and "0 exit mismatches and 0 prediction flips" in md
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.md", "run"]


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    ran = []

    def ok(name):
        def fn(ctx):
            ran.append(name)
            return {"figure": 1.0}
        return fn

    def boom(ctx):
        ran.append("throughput")
        raise RuntimeError("the accelerator caught fire")

    def skip(ctx):
        raise gpu_check.SectionSkipped("no archive here")

    monkeypatch.setattr(gpu_check, "SECTIONS", (("cuda_tests", ok("cuda_tests")), ("throughput", boom),
                                                ("runner_vs_simulation", ok("runner_vs_simulation")),
                                                ("early_exit_timing", ok("early_exit_timing")),
                                                ("cifar10_from_scratch", skip)))
    assert gpu_check.main(["--dry", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert ran == ["cuda_tests", "throughput", "runner_vs_simulation", "early_exit_timing"]
    assert report["failed"] == ["throughput"]
    assert report["sections"]["throughput"]["error"] == "RuntimeError: the accelerator caught fire"
    assert "Traceback" in report["sections"]["throughput"]["traceback"]
    assert report["sections"]["cifar10_from_scratch"] == {"status": "skipped", "note": "no archive here",
                                                          "seconds": report["sections"]["cifar10_from_scratch"]
                                                          ["seconds"]}
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| throughput | failed |" in md and "no archive here" in md
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'gpu-check.json'}" in printed and f"wrote {tmp_path / 'gpu-check.md'}" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_the_full_check_without_a_gpu_says_to_use_the_dry_run(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry" in capsys.readouterr().err and not (tmp_path / "gpu-check.json").exists()


def test_a_check_stopped_mid_way_keeps_the_figures_of_the_sections_it_finished(tmp_path, monkeypatch):
    # a time limit (timeout, a lease running out) kills the process inside a section: the files on disk must
    # already hold every section finished before it and name the ones not reached
    seen = {}

    def ok(ctx):
        return {"figure": 2.5}

    def killed(ctx):
        seen.update(json.loads((tmp_path / "gpu-check.json").read_text()))
        seen["md"] = (tmp_path / "gpu-check.md").read_text()
        raise KeyboardInterrupt  # not caught by the section wrapper: the process dies here

    monkeypatch.setattr(gpu_check, "SECTIONS", (("cuda_tests", ok), ("throughput", ok),
                                                ("early_exit_timing", killed), ("cifar10_from_scratch", ok)))
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--dry", "--out", str(tmp_path)])
    assert list(seen["sections"]) == ["cuda_tests", "throughput"]
    assert seen["sections"]["throughput"]["figure"] == 2.5 and seen["failed"] == []
    assert seen["not_reached"] == ["early_exit_timing", "cifar10_from_scratch"]
    assert "Not reached (the check stopped before them): early_exit_timing, cifar10_from_scratch." in seen["md"]
    assert "## 4. From scratch" not in seen["md"]
