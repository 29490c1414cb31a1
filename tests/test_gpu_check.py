"""The device check (``python -m bench.gpu_check``): its dry run goes through every section end to end on the
CPU at tiny sizes, with fvcore unimportable as on a lent GPU machine, and writes one JSON and one markdown file of
real figures; a failing section is recorded while the others still run, and the exit status says so. The pieces
(the archive lookup, pytest missing, the early-exit timing of one backbone, the GPU target's verdicts, the
interpreter the Makefile picks) are tested on their own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import common, early_exit, sections
from bench.measure.flops import fvcore_available
from bench.pipeline.runner import CPU_LOGIT_TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
TIMED = common.REQUIRED_TIMED


def without_fvcore_env(folder: Path) -> dict:
    """The environment of a subprocess in which ``import fvcore`` fails (a sitecustomize first on the path), as on a
    machine without it; independent of the check's own --no-fvcore."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import sys\nfor n in ('fvcore', 'fvcore.nn', 'fvcore.nn.jit_handles'):"
                                             "\n    sys.modules[n] = None\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """The whole dry run in a subprocess without fvcore (about 25-40 s on 2 busy cores)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = without_fvcore_env(tmp_path_factory.mktemp("no-fvcore"))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert (out / "gpu-check.json").exists(), proc.stdout + proc.stderr
    return proc, out, json.loads((out / "gpu-check.json").read_text())


@pytest.mark.slow
def test_the_dry_run_passes_every_section_with_real_figures(dry):
    proc, out, report = dry
    s = report["sections"]
    assert proc.returncode == 0 and report["failed"] == [] and report["dry"] and report["device"] == "cpu", \
        {k: v.get("error") for k, v in s.items()}
    assert proc.stdout.splitlines()[0].startswith("gpu-check: estimated ")  # the estimate comes first
    assert list(s) == [name for name, _ in gpu_check.SECTIONS]
    assert {v["status"] for v in s.values()} == {"ok"} and all(v["seconds"] >= 0 for v in s.values())
    # 1. the CUDA tests ran (and skipped: no GPU here), and the real runner equals the simulation (to float32 rounding)
    t = s["cuda_tests"]
    assert t["exit_code"] == 0 and t["failed"] == t["error"] == 0 and len(t["cases"]) >= 3
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
    # 3. real early exit on both backbones (checked in the next test)
    assert set(s["early_exit_timing"]["backbones"]) == {"vit_s16_224", "vit_cifar"}
    # 4. the bench run on a generated image folder, then its report
    c = s["cifar10_from_scratch"]
    rows = {(row["method"], row["budget"]): row for row in c["rows"]}
    assert 0 <= rows[("static", None)]["accuracy"] <= 1 and rows[("static", None)]["throughput"] > 0
    assert rows[("threshold", 0.5)]["wall_rel"] > 0 and 0 < rows[("threshold", 0.5)]["macs_rel"] <= 1.1
    assert c["jeidnn_fit"] == {"epochs": "2", "warmup_epochs": "1", "lambdas": "[0.1,1.0]"}
    assert (out / "run" / "report" / "report.md").read_text().count("Latency and throughput") == 1
    assert "| static backbone |" in c["timing_md"]


@pytest.mark.slow
def test_the_dry_run_without_fvcore_times_every_method_on_vit_s16_and_names_its_counter(dry):
    _, _, report = dry
    assert report["fvcore"] is None and report["macs_counter"] == "analytic"
    assert set(report["macs_counters"].values()) == {"analytic"}
    e = report["sections"]["early_exit_timing"]
    assert set(e["methods"]) >= set(TIMED) and "msdnet" not in e["methods"]  # MSDNet runs on its own network
    assert "1.1 x macs_rel" in e["target"] and "CUDA" in e["targets"]["status"]
    vs = e["backbones"]["vit_s16_224"]
    # the ViT-S/16-224 entry: the timm architecture at a reduced size in the dry run, and it says so
    assert vs["timm_model"] == "vit_small_patch16_224" and vs["reduced_for_dry_run"] is True
    assert vs["architecture"] == {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 6, "num_heads": 2}
    for key, v in e["backbones"].items():
        assert v["macs_counter"] == "analytic" and v["static"]["throughput"] > 0
        for name in TIMED:
            row = v["methods"][name]
            assert 0 < row["macs_rel"] <= 1.1 and row["wall_rel"] > 0 and row["wall_rel_b1"] > 0, (key, name)
            # the runner's contract: at most one host read per block, at the timing batch and at batch 1
            assert 0 <= row["host_syncs_per_block"] <= 1 and 0 <= row["host_syncs_per_block_b1"] <= 1, (key, name)
            assert row["meets_target"] is None  # the CPU gets no verdict
            assert row["n"] == 128 and row["n_b1"] == 8 and row["n_latency"] == 4
    # JEI-DNN had joint epochs after its warm-up (the dry run: 1 warm-up epoch within 2)
    assert vs["methods"]["jeidnn"]["joint_epochs_run"] >= 1


@pytest.mark.slow
def test_the_markdown_names_the_device_and_holds_the_figures(dry):
    _, out, report = dry
    md = (out / "gpu-check.md").read_text()
    assert md.startswith(f"# Device check on {report['device_name']} (dry run)") and "CPU" in report["device_name"]
    for heading in ("## 1. CUDA tests", "## 2. Training and feature-extraction throughput", "## 3. Real early exit",
                    "### ViT-S/16-224: ", "### CIFAR-size ViT: ", "## 4. From scratch"):
        assert heading in md
    assert "MACs counter: analytic (fvcore not importable)" in md
    assert "the target is for CUDA; this run is on the CPU" in md and "| — (CPU: target is for CUDA) |" in md
    assert "0 exit mismatches and 0 prediction flips" in md
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.md", "run"]


# ------------------------------------------------------------------------------------------------ the pieces

def test_one_backbone_times_every_method_without_fvcore(monkeypatch, tmp_path):
    """The early-exit timing of one backbone (the code path of ViT-S/16-224, at a toy size) with fvcore blocked:
    every required method fitted and timed, its figures and the counter recorded."""
    for name in common.FVCORE_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    sizes = common.DRY
    ctx = {"device": "cpu", "dry": True, "sizes": sizes, "tmp": str(tmp_path)}
    fields = dict(sizes.vit_s, embed_dim=16, depth=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = early_exit.time_backbone(ctx, "vit_s16_224", fields, 64, 64, list(TIMED))
    finally:
        torch.set_num_threads(threads)
    assert out["macs_counter"] == "analytic" and ctx["macs_counters"] == {out["backbone"]: "analytic"}
    assert out["timm_model"] == "vit_small_patch16_224" and out["architecture"]["depth"] == 3
    assert "random initialisation" in out["weights"]
    for name in TIMED:
        row = out["methods"][name]
        assert {"macs_rel", "wall_rel", "host_syncs_per_block", "wall_rel_b1", "latency_ms"} <= set(row), name
        assert row["wall_rel"] > 0 and 0 < row["macs_rel"] <= 1.1 and row["meets_target"] is None
        assert 0 <= row["host_syncs_per_block"] <= 1
    assert out["methods"]["jeidnn"]["fit_params"] == {"warmup_epochs": 1, "epochs": 2, "lambdas": [0.1, 1.0]}


def test_the_gpu_target_is_judged_per_method_on_cuda_only():
    rows = {"threshold": {"meets_target": True}, "jeidnn": {"meets_target": False}}
    report = {"backbones": {"vit_s16_224": {"methods": rows}}}
    assert early_exit.verdicts(report, "cuda") == {"status": "1 of 2 methods pass", "pass": ["threshold"],
                                                   "fail": ["jeidnn"]}
    assert "target is for CUDA" in early_exit.verdicts(report, "cpu")["status"]
    assert common.FULL.timing_batch == 256 and early_exit.target_text(256).startswith("wall_rel <= 1.1 x macs_rel")


def test_the_compile_check_times_vit_s16_compiled_against_eager(monkeypatch):
    """The full check (``compile_check``) trains ViT-S/16 a second time with its step handed to torch.compile (a
    recorder here: the real one compiles for minutes on a CPU), records the rate against eager and says so in the
    markdown; the dry run leaves it out and says that too."""
    import dataclasses

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    sizes = dataclasses.replace(common.DRY, compile_check=True, train_images=(64, 64), feature_images=(32, 32))
    t = sections.throughput({"sizes": sizes, "device": "cpu"})
    assert len(calls) == 1 and common.FULL.compile_check and not common.DRY.compile_check
    comp = t["vit_s16_224_compiled"]
    assert comp["train_images_per_s"] > 0 and comp["first_epoch_s"] > 0
    assert comp["speedup"] == pytest.approx(comp["train_images_per_s"] / t["vit_s16_224"]["train_images_per_s"])
    report = {"device_name": "CPU", "device": "cpu", "dry": False, "command": "make gpu-check", "torch": "2",
              "date": "today", "total_seconds": 1.0, "git_sha": "0" * 40, "python": "3", "not_reached": [],
              "sections": {"throughput": {"status": "ok", "seconds": 1.0, **t}}}
    md = gpu_check.report.markdown(report)
    assert f"{comp['speedup']:.2f}x eager" in md
    del report["sections"]["throughput"]["vit_s16_224_compiled"]
    assert "`--compile`: not measured in this check" in gpu_check.report.markdown(report)


def test_the_full_check_is_estimated_within_its_eight_minutes():
    assert set(common.FULL.estimate_s) == {name for name, _ in gpu_check.SECTIONS} == set(common.DRY.estimate_s)
    assert sum(common.FULL.estimate_s.values()) <= common.FULL.time_limit_s <= 8 * 60
    assert "on one H100" in gpu_check.estimate_line(common.FULL)
    # the paper's backbone, at its size, and the batches of the target
    assert common.FULL.vit_s["model"] == "vit_small_patch16_224" and common.FULL.vit_s["img_size"] == 224
    assert common.FULL.ee_budget == 0.5 and common.FULL.n_latency > 0
    # JEI-DNN gets joint epochs after its warm-up, in the timing and in the CIFAR-10 run
    p = common.FULL.method_params["jeidnn"]
    assert p["epochs"] - p["warmup_epochs"] >= 4
    assert "jeidnn.warmup_epochs=2" in common.FULL.run_args and "jeidnn.epochs=8" in common.FULL.run_args


def test_the_archive_is_looked_for_in_the_checkout_then_beside_it(tmp_path, monkeypatch):
    given = tmp_path / "c10.tar.gz"
    assert common.data_candidates(str(given), env={}) == [given]
    assert common.data_candidates(None, env={"DATA": str(given)}) == [given]
    assert common.data_candidates(None, env={}) == [ROOT / "shared" / "data" / "cifar10-jpeg.tar.gz",
                                                    ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"]
    assert common.find_data(str(given), env={}) == (None, [given])
    given.write_bytes(b"")
    assert common.find_data(None, env={"DATA": str(given)}) == (given, [given])
    # none there: the section is skipped with a note naming where it looked, not a failure of the check
    ctx = {"device": "cpu", "dry": False, "sizes": common.FULL, "out": str(tmp_path), "tmp": str(tmp_path),
           "data": str(tmp_path / "missing.tar.gz")}
    with pytest.raises(common.SectionSkipped, match="missing.tar.gz.*DATA=PATH"):
        sections.cifar10_from_scratch(ctx)


def test_the_cuda_tests_are_skipped_with_a_note_without_pytest(monkeypatch, tmp_path):
    real = sections.importlib.util.find_spec
    monkeypatch.setattr(sections.importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else
                        real(name, *a))
    with pytest.raises(common.SectionSkipped, match="pytest is not importable"):
        sections.cuda_tests({"tmp": str(tmp_path), "sizes": common.DRY})


def test_no_fvcore_blocks_it_for_the_check_and_its_subprocesses_only(tmp_path, monkeypatch):
    seen, before = {}, fvcore_available()

    def probe(ctx):
        seen["here"] = fvcore_available()
        env = {**os.environ, **ctx["sub_env"]}
        seen["subprocess"] = subprocess.run([sys.executable, "-c", "import fvcore"], env=env).returncode
        return {}

    monkeypatch.setattr(gpu_check, "SECTIONS", (("cuda_tests", probe),))
    assert gpu_check.main(["--dry", "--no-fvcore", "--out", str(tmp_path)], log=lambda *a, **k: None) == 0
    assert seen == {"here": False, "subprocess": 1}
    assert json.loads((tmp_path / "gpu-check.json").read_text())["fvcore_blocked"] is True
    assert fvcore_available() == before  # as it was, after the check


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_picks_an_interpreter_that_imports_and_installs_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DATA", "ARGS", "PYTHON", "GPU_PYTHON",
                                                            "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "-n", "gpu-check", "PYTHON=python3"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60).stdout
    assert 'py="python3"' in dry and "--out \"results/gpu-check\"" in dry
    venv = ROOT / ".venv" / "bin" / "python"
    if not venv.exists():
        pytest.skip("no .venv here")
    assert 'py=".venv/bin/python"' in subprocess.run(["make", "-n", "gpu-check-dry"], cwd=ROOT, env=env,
                                                      capture_output=True, text=True, timeout=60).stdout
    run = subprocess.run(["make", "gpu-check-dry", "ARGS=--help", f"OUT={tmp_path}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # under `make test` (CI) this make is a sub-make: its own lines may come first
    assert "gpu-check: interpreter .venv/bin/python (" in run.stdout and "make setup" not in run.stdout
    assert "--no-fvcore" in run.stdout  # the dry run rehearses a machine without fvcore


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
    assert report["macs_counter"] in ("fvcore+attention-handle", "analytic")  # before any task: the ViT's
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| throughput | failed |" in md and "no archive here" in md
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-check: estimated ")
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
