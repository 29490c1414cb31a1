"""The timings measure what their rows say: the clock on the model's device's stream, staging sized from the
device's free memory (and the rows saying how many test images were timed), the timed images' own cost beside
their wall_rel, the dtype, no cuDNN autotuning inside the clock, one timing at a time per GPU, and the runner's
host reads per block. The CUDA paths run here through fakes of ``torch.cuda``; the tests marked CUDA run them for
real and skip without a GPU (``python -m bench.gpu_check`` runs them on one)."""
import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch

from bench.backbones.base import to_tensor
from bench.backbones.vit import ViT, ViTConfig
from bench.cli import main
from bench.core.interface import create_method, resolve_points
from bench.pipeline import run as run_module
from bench.pipeline import timing
from bench.pipeline.config import RunConfig
from bench.pipeline.evaluate import evaluate_method
from bench.pipeline.run import static_timing_rows, timing_rows
from bench.pipeline.tasks import load_task
from bench.pipeline.timing import (images_to_stage, no_autotuning, precision, stage_inputs, static_timing,
                                   time_call, timing_lock, timing_metrics)

TINY_FIELDS = dict(img_size=8, patch_size=2, embed_dim=32, depth=4, num_heads=2, epochs=4, batch_size=128,
                   augment="none")
TINY = ViTConfig(**TINY_FIELDS)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PER_IMAGE = 1 * 8 * 8 * 4  # bytes of one staged digits image: 1 channel, 8 x 8, float32


def _config(cache, device="cpu", **kw) -> RunConfig:
    kw = {"timing_batch": 100, **kw}
    return RunConfig(methods=["threshold"], dataset="digits", cache_dir=str(cache), overrides={"backbone": TINY_FIELDS},
                     device=device, timing=True, **kw)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The tiny digits ViT trained and cached on the CPU (360 test images) with threshold fitted on it."""
    cache = tmp_path_factory.mktemp("cache")
    loaded = load_task(_config(cache), seed=0)
    assert loaded.backbone.plugin is ViT and loaded.backbone.config == TINY
    method = create_method("threshold").fit(loaded.task)
    return loaded, method, cache


def _test_macs_rel(method, loaded, points) -> dict[float, float]:
    rows, _ = evaluate_method(method, loaded.task, points)
    return {r["budget"]: r["value"] for r in rows
            if r["split"] == "test" and r["metric"] == "macs_rel" and r["exit"] is None and r["budget"] is not None}


# -- what timing_metrics and static_timing return ----------------------------------------------------------------

def test_timing_metrics_are_sane(loaded):
    loaded, method, _ = loaded
    ds, backbone, task = loaded.dataset, loaded.backbone, loaded.task
    point = resolve_points(method, task, [0.5])[0]
    assert point.budget == 0.5 and not point.infeasible
    t = timing_metrics(backbone.stages(), method, point, ds.test_x, TINY.img_size, batch_size=128, n_latency=4,
                       repeats=2, static_macs=task.macs.static)
    assert set(t) == {"latency_ms", "latency_ms_p90", "throughput", "wall_rel", "host_syncs_per_block",
                      "timed_macs_rel"}
    assert 0 < t["latency_ms"] <= t["latency_ms_p90"] and t["throughput"] > 0 and t["wall_rel"] > 0
    assert 0 <= t["host_syncs_per_block"] <= 1  # the runner's contract: at most the survivors' count per block
    # throughput, wall_rel and the cost over the whole test split (not its first batch), latency over 4 images
    n = len(ds.test_x)
    assert t.n == {"throughput": n, "wall_rel": n, "latency_ms": 4, "latency_ms_p90": 4,
                   "host_syncs_per_block": n, "timed_macs_rel": n}
    assert t.exits.shape == (n,) and t.exits.dtype == np.int64
    want = method.costs_[t.exits].mean() / task.macs.static
    assert t["timed_macs_rel"] == pytest.approx(want, rel=1e-12) and 0 < t["timed_macs_rel"] < 1
    # without the static MACs there is no cost to report, and the signature stays as callers use it
    plain = timing_metrics(backbone.stages(), method, point, ds.test_x, TINY.img_size, "cpu", 128, 2, 1)
    assert "timed_macs_rel" not in plain and "host_syncs_per_block" in plain
    s = static_timing(backbone.stages(), ds.test_x, TINY.img_size, batch_size=128, n_latency=3, repeats=2)
    assert set(s) == {"latency_ms", "latency_ms_p90", "throughput", "host_syncs_per_block"}
    assert 0 < s["latency_ms"] <= s["latency_ms_p90"] and s["throughput"] > 0 and s["host_syncs_per_block"] == 0
    assert s.n == {"throughput": n, "latency_ms": 3, "latency_ms_p90": 3, "host_syncs_per_block": n}


def test_bf16_runs_both_passes_under_autocast(loaded):
    """``dtype="bf16"``: the early-exit blocks and the static forward both run under bfloat16 autocast (CPU
    autocast here; the same code on CUDA), the latency passes too; fp32 runs neither."""
    loaded, method, _ = loaded
    ds, backbone, task = loaded.dataset, loaded.backbone, loaded.task
    point = resolve_points(method, task, [0.5])[0]
    seen = {"block": set(), "static": set()}

    class Spy:  # the staged forward, recording the autocast state each call runs in
        def __init__(self, st):
            self.st, self.num_exits = st, st.num_exits

        def _state(self):
            on = torch.is_autocast_enabled("cpu")
            return torch.get_autocast_dtype("cpu") if on else None

        def __getattr__(self, name):  # embed, exit_feature, select, ...: the real ones
            return getattr(self.st, name)

        def block(self, k, h):
            seen["block"].add(self._state())
            return self.st.block(k, h)

        def static_forward(self, x):
            seen["static"].add(self._state())
            return self.st.static_forward(x)

    spy = Spy(backbone.stages())
    t = timing_metrics(spy, method, point, ds.test_x, TINY.img_size, batch_size=128, n_latency=2, repeats=1,
                       dtype="bf16", static_macs=task.macs.static)
    s = static_timing(spy, ds.test_x, TINY.img_size, batch_size=128, n_latency=2, repeats=1, dtype="bf16")
    assert seen == {"block": {torch.bfloat16}, "static": {torch.bfloat16}}
    assert t["wall_rel"] > 0 and s["throughput"] > 0 and 0 < t["timed_macs_rel"] < 1.1
    seen = {"block": set(), "static": set()}
    timing_metrics(spy, method, point, ds.test_x, TINY.img_size, batch_size=128, n_latency=1, repeats=1)
    assert seen == {"block": {None}, "static": {None}}
    with pytest.raises(ValueError, match="fp16"):
        timing_metrics(spy, method, point, ds.test_x, TINY.img_size, dtype="fp16")
    with pytest.raises(ValueError, match="fp32, bf16"):
        static_timing(spy, ds.test_x, TINY.img_size, dtype="float16")


def test_precision_is_autocast_for_bf16_only():
    with precision("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


# -- the rows of a timed run ---------------------------------------------------------------------------------------

def test_timing_rows_when_every_test_image_fits(loaded):
    """On the CPU the whole split is timed: the params say 360 of 360, and the timed images' cost equals the test
    macs_rel of the same point (the real runner's exits equal the simulation's in fp32 on the CPU)."""
    loaded, method, cache = loaded
    cfg = _config(cache)
    points = resolve_points(method, loaded.task, [0.5, 1.0])
    rows = timing_rows(method, loaded, points, cfg)
    n = len(loaded.dataset.test_x)
    by = {(r["budget"], r["metric"]): r for r in rows}
    assert {m for _, m in by} == {"latency_ms", "latency_ms_p90", "throughput", "wall_rel", "timed_macs_rel",
                                  "host_syncs_per_block"}
    assert len(rows) == 2 * 6
    for budget, want in _test_macs_rel(method, loaded, points).items():
        assert by[(budget, "timed_macs_rel")]["value"] == pytest.approx(want, rel=1e-9)
        assert by[(budget, "timed_macs_rel")]["n"] == by[(budget, "throughput")]["n"] == n
        assert 0 <= by[(budget, "host_syncs_per_block")]["value"] <= 1
    for r in rows:
        p = json.loads(r["params"])
        assert (p["timed_images"], p["test_images"], p["dtype"], p["timing_batch"]) == (n, n, "float32", 100)
        assert "tf32" not in p  # CPU
    static = {r["metric"]: r for r in static_timing_rows(loaded, cfg)}
    assert set(static) == {"latency_ms", "latency_ms_p90", "throughput", "host_syncs_per_block"}
    assert static["host_syncs_per_block"]["value"] == 0 and static["throughput"]["n"] == n
    assert json.loads(static["throughput"]["params"])["timed_images"] == n


def test_timing_rows_say_when_not_every_test_image_fits(loaded, monkeypatch):
    """A device that holds 250 images: the first 200 (whole batches of 100) are timed, the rows say 200 of 360,
    and timed_macs_rel is the cost of exactly those 200 images, next to the test macs_rel of all 360."""
    loaded, method, cache = loaded
    monkeypatch.setattr(timing, "stage_budget", lambda device: 250 * PER_IMAGE)
    point = resolve_points(method, loaded.task, [0.5])[0]
    rows = {r["metric"]: r for r in timing_rows(method, loaded, [point], _config(cache))}
    p = json.loads(rows["wall_rel"]["params"])
    assert (p["timed_images"], p["test_images"], p["dtype"]) == (200, 360, "float32")
    assert rows["throughput"]["n"] == rows["wall_rel"]["n"] == rows["timed_macs_rel"]["n"] == 200
    test = loaded.task.splits["test"]
    exits = np.asarray(method.decide(method.exit_logits(test, point), point))
    first = method.costs_[exits[:200]].mean() / loaded.task.macs.static
    whole = _test_macs_rel(method, loaded, [point])[0.5]
    assert rows["timed_macs_rel"]["value"] == pytest.approx(first, rel=1e-9)
    assert whole == pytest.approx(method.costs_[exits].mean() / loaded.task.macs.static)
    assert abs(first - whole) > 1e-6  # the two costs differ here: the rows must not pass one off as the other


def test_timing_rows_hold_the_device_timing_lock_and_name_the_dtype(loaded, monkeypatch):
    loaded, method, cache = loaded
    taken = []

    @contextlib.contextmanager
    def lock(cache_dir, device, say=None):
        taken.append((str(cache_dir), device))
        yield

    monkeypatch.setattr(run_module, "timing_lock", lock)
    cfg = _config(cache, timing_dtype="bf16", timing_batch=400)
    point = resolve_points(method, loaded.task, [0.5])[0]
    rows = timing_rows(method, loaded, [point], cfg) + static_timing_rows(loaded, cfg)
    assert taken == [(str(cache), "cpu"), (str(cache), "cpu")]
    assert {json.loads(r["params"])["dtype"] for r in rows} == {"bfloat16-autocast"}


# -- staging -------------------------------------------------------------------------------------------------------

def test_staged_inputs_are_the_whole_split_on_cpu_or_whole_batches_within_the_budget(loaded, monkeypatch):
    ds = loaded[0].dataset
    x = stage_inputs(ds.test_x, TINY.img_size, "cpu", 100)
    assert x.shape == (len(ds.test_x), 1, 8, 8) and x.is_contiguous()
    assert torch.equal(x, to_tensor(ds.test_x, TINY.img_size))
    monkeypatch.setattr(timing, "stage_budget", lambda device: 250 * PER_IMAGE)
    assert len(stage_inputs(ds.test_x, TINY.img_size, "cpu", 100)) == 200  # whole batches only
    assert len(stage_inputs(ds.test_x, TINY.img_size, "cpu", 300)) == 300  # at least one batch
    part = stage_inputs(ds.test_x, TINY.img_size, "cpu", 100, n_min=230)
    assert len(part) == 230 and torch.equal(part, to_tensor(ds.test_x[:230], TINY.img_size))


def test_images_to_stage_at_224_px():
    per_image = 3 * 224 * 224 * 4
    assert images_to_stage(10_000, per_image, None, 256) == 10_000  # CPU: the whole split
    assert images_to_stage(10_000, per_image, 60 * 2 ** 30, 256) == 10_000  # an 80 GB card
    assert images_to_stage(10_000, per_image, 4 * 2 ** 30, 256) == 6912  # 4 GiB: 27 whole batches
    assert images_to_stage(10_000, per_image, 0, 256, n_min=64) == 256  # at least one batch


def test_stage_budget_reads_the_free_memory_of_the_given_device(monkeypatch):
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 40 * 2 ** 30, 80 * 2 ** 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert timing.stage_budget("cpu") is None and asked == []
    assert timing.stage_budget("cuda:1") == 30 * 2 ** 30  # 40 GiB free less a quarter
    assert asked == [torch.device("cuda:1")]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2 ** 30, 8 * 2 ** 30))
    assert timing.stage_budget("cuda:0") == 2 * 2 ** 30  # the 2 GiB floor, not a quarter
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 30, 8 * 2 ** 30))
    assert timing.stage_budget("cuda:0") == 0


# -- the clock, autotuning, the lock -----------------------------------------------------------------------------

def test_time_call_runs_warmup_then_the_timed_repeats():
    calls = []
    times = time_call(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and times.shape == (3,) and (times >= 0).all()


def test_time_call_records_on_the_stream_of_the_model_device(monkeypatch):
    """``cuda:1``: the events go on cuda:1's current stream, inside cuda:1's device context, after synchronising
    cuda:1 (a fake torch.cuda: the logic runs without a GPU)."""
    log = []

    class Stream:
        def __init__(self, device):
            self.device = device

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self, stream=None):
            log.append(("record", stream.device))
            self.t = len(log)

        def synchronize(self):
            log.append(("wait",))

        def elapsed_time(self, end):
            return 1000.0 * (end.t - self.t)  # ms

    @contextlib.contextmanager
    def device(d):
        log.append(("enter", d))
        yield
        log.append(("exit", d))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: Stream(d))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: log.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "device", device)
    times = time_call(lambda: log.append(("fn",)), "cuda:1", repeats=2, warmup=1)
    d = torch.device("cuda:1")
    assert log == [("enter", d), ("fn",), ("sync", d),
                   ("record", d), ("fn",), ("record", d), ("wait",),
                   ("record", d), ("fn",), ("record", d), ("wait",), ("exit", d)]
    assert times.tolist() == [2.0, 2.0]  # the fake clock: two log entries between the events, in seconds


def test_no_autotuning_turns_cudnn_benchmark_off_and_restores_it():
    before = torch.backends.cudnn.benchmark
    try:
        for previous in (True, False):
            torch.backends.cudnn.benchmark = previous
            with no_autotuning():
                assert torch.backends.cudnn.benchmark is False
            assert torch.backends.cudnn.benchmark is previous
        torch.backends.cudnn.benchmark = True
        with pytest.raises(RuntimeError), no_autotuning():
            raise RuntimeError("a failed timing")
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_timing_metrics_time_without_autotuning(loaded):
    loaded, method, _ = loaded
    ds, backbone, task = loaded.dataset, loaded.backbone, loaded.task
    point = resolve_points(method, task, [0.5])[0]
    seen = set()
    st = backbone.stages()
    real = st.static_forward

    def static_forward(x):
        seen.add(torch.backends.cudnn.benchmark)
        return real(x)

    st.static_forward = static_forward
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True  # as use_fast_cuda leaves it
        timing_metrics(st, method, point, ds.test_x, TINY.img_size, batch_size=128, n_latency=1, repeats=1)
        static_timing(st, ds.test_x, TINY.img_size, batch_size=128, n_latency=1, repeats=1)
        assert seen == {False} and torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_timing_lock_serialises_a_gpu_and_leaves_the_cpu_alone(tmp_path, monkeypatch):
    emptied = []
    monkeypatch.setattr(timing, "device_key", lambda device: "gpu-test-uuid")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    path = tmp_path / "locks" / "timing-gpu-test-uuid.lock"
    with timing_lock(tmp_path, "cuda:0"):
        holder = json.loads(path.read_text())  # held, with its holder's pid
        assert holder["pid"] > 0
        assert not emptied
    assert not path.exists() and emptied == [1]  # released, and the cached memory given back first
    with pytest.raises(RuntimeError), timing_lock(tmp_path, "cuda:0"):
        raise RuntimeError("a failed timing")
    assert not path.exists()  # released on failure too
    with timing_lock(tmp_path / "cpu", "cpu"):
        pass
    assert not (tmp_path / "cpu").exists()


def test_device_key_is_the_gpu_uuid(monkeypatch):
    class Props:
        uuid = "GPU-1234"

    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: seen.append(d) or Props())
    assert timing.device_key("cuda:1") == "gpu-GPU-1234" and seen == [torch.device("cuda:1")]
    Props.uuid = ""
    assert timing.device_key("cuda:1").endswith("-cuda1")


# -- the flag --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [(["--timing", "--timing-dtype", "fp16"], "--timing-dtype 'fp16'"),
                                        (["--timing-dtype", "bf16"], "add --timing")])
def test_a_bad_timing_dtype_exits_2_naming_the_flag(tmp_path, capsys, args, says):
    rc = main(["run", "--methods", "threshold", "--device", "cpu", "--out", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_timing_dtype_joins_the_run_id_only_when_not_the_default():
    fp32 = RunConfig(methods=["threshold"], device="cpu", timing=True)
    assert "timing_dtype" not in fp32.identity()  # the run ids of earlier runs stay what they were
    bf16 = dataclasses.replace(fp32, timing_dtype="bf16")
    assert bf16.identity()["timing_dtype"] == "bf16" and bf16.run_id != fp32.run_id


# -- on a GPU --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_loaded(tmp_path_factory):
    """Trained and cached on CUDA, as a --device cuda run does."""
    cache = tmp_path_factory.mktemp("cuda-cache")
    loaded = load_task(_config(cache, "cuda"), seed=0)
    return loaded, create_method("threshold").fit(loaded.task), cache


@CUDA
def test_cuda_time_call_times_the_device_work():
    a = torch.randn(2048, 2048, device="cuda")
    times = time_call(lambda: [a @ a for _ in range(20)], "cuda", repeats=3, warmup=1)
    assert times.shape == (3,) and (times > 0).all()


@CUDA
def test_cuda_staging_is_one_tensor_of_the_whole_small_split(cuda_loaded):
    loaded = cuda_loaded[0]
    ds = loaded.dataset
    x = stage_inputs(ds.test_x, TINY.img_size, "cuda", 100)
    assert x.device.type == "cuda" and x.shape == (len(ds.test_x), 1, 8, 8) and x.is_contiguous()
    torch.testing.assert_close(x.cpu(), to_tensor(ds.test_x, TINY.img_size))
    assert timing.stage_budget("cuda") > 0


@CUDA
def test_cuda_static_forward_reads_nothing_back(cuda_loaded):
    """The static row's host_syncs_per_block is 0 by construction: its forward makes no host synchronisation."""
    loaded = cuda_loaded[0]
    loaded.backbone.model.cuda().eval()
    x = stage_inputs(loaded.dataset.test_x, TINY.img_size, "cuda", 100)
    st = loaded.backbone.stages()
    with torch.no_grad():
        st.static_forward(x[:100])  # first call outside: lazy initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            st.static_forward(x[:100])
        finally:
            torch.cuda.set_sync_debug_mode("default")


@CUDA
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_timing_is_positive_and_counts_the_images(cuda_loaded, dtype):
    loaded, method, cache = cuda_loaded
    ds, backbone, task = loaded.dataset, loaded.backbone, loaded.task
    point = resolve_points(method, task, [0.5])[0]
    backbone.model.cuda()
    before = torch.backends.cudnn.benchmark
    t = timing_metrics(backbone.stages(), method, point, ds.test_x, TINY.img_size, "cuda", 128, 4, 2, dtype=dtype,
                       static_macs=task.macs.static)
    s = static_timing(backbone.stages(), ds.test_x, TINY.img_size, "cuda", 128, 4, 2, dtype=dtype)
    assert t["throughput"] > 0 and t["wall_rel"] > 0 and 0 < t["latency_ms"] <= t["latency_ms_p90"]
    assert s["throughput"] > 0 and t.n["throughput"] == s.n["throughput"] == len(ds.test_x)
    assert 0 <= t["host_syncs_per_block"] <= 1 and 0 < t["timed_macs_rel"] < 1.1
    assert torch.backends.cudnn.benchmark == before
    rows = timing_rows(method, loaded, [point], _config(cache, "cuda", timing_dtype=dtype))
    p = json.loads(rows[0]["params"])
    assert p["dtype"] == {"fp32": "float32", "bf16": "bfloat16-autocast"}[dtype] and p["timed_images"] == 360
    assert not list((cache / "locks").glob("timing-*.lock"))  # the lock was released
