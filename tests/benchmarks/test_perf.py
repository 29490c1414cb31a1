"""Performance benchmarks (pytest-benchmark). They report; they do not flake: each asserts only properties
that hold on any machine (equal results), and prints the measured figures for the README.

The cheap one runs in the default suite; the 12-block ViT ones are marked ``perf`` (``make bench-perf``).
"""
import time

import numpy as np
import pytest
import timm
import torch

from bench.pipeline.evaluate import evaluate_method
from bench.pipeline.features import compute_features
from bench.measure.flops import fvcore_vit_macs
from bench.core.interface import create_method
from bench.pipeline.runner import run_early_exit, time_call
from bench.core.task import SplitData, Task, synthetic_task

BUDGETS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_evaluate_all_budgets_on_10k_test_samples(benchmark):
    """Calibrate 9 budgets on val and evaluate them (all metrics, conformal included) on 10,000 test samples
    from cached outputs. Target: under 1 s."""
    task = synthetic_task(num_exits=6, n=20_000, dim=32, num_classes=10)
    method = create_method("threshold", {"epochs": 2}).fit(task)

    def run():
        points = method.calibrate(task, BUDGETS)
        return evaluate_method(method, task, points, BUDGETS, splits=("test",))

    rows, _ = benchmark(run)
    assert len(task.splits["test"]) == 10_000 and len(rows) > 9 * 10
    print(f"\nevaluate 9 budgets x 10k samples: median {benchmark.stats.stats.median:.3f} s")


def vit12():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, in_chans=3,
                             embed_dim=192, depth=12, num_heads=3, num_classes=10).eval()


def image_splits(model, n_fit: int, n_test: int, seed: int):
    """Splits of a model's own exit features on structured random images (class = dominant colour pattern),
    so exit heads have something to learn and confidence varies across samples; and the images (uint8)."""
    gen = torch.Generator().manual_seed(seed)
    total = 2 * n_fit + n_test
    y = torch.randint(0, 10, (total,), generator=gen)
    base = torch.rand(10, 3, 32, 32, generator=gen)
    noise = torch.rand(total, 3, 32, 32, generator=gen) * torch.rand(total, 1, 1, 1, generator=gen) * 2
    x = ((base[y] + noise) / 3 * 255).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    feats = compute_features(model, x, 32, batch_size=256)
    y = y.numpy()
    parts = {"train": slice(0, n_fit), "val": slice(n_fit, 2 * n_fit), "test": slice(2 * n_fit, total)}
    splits = {k: SplitData(feats[:, s], y[s], np.arange(total)[s]) for k, s in parts.items()}
    splits["cal"] = splits["val"]
    return splits, x


def image_task(model, n_fit=1024, n_test=256, seed=0):
    """A task from a 12-block ViT's own features on structured random images (class = dominant colour
    pattern), so exit heads have something to learn and confidence varies across samples."""
    splits, x = image_splits(model, n_fit, n_test, seed)
    return Task("images", seed, 10, splits, model.head.weight.detach(), model.head.bias.detach(),
                fvcore_vit_macs(model), key=f"vit12-{seed}"), x


@torch.no_grad()
def static_forward(model, x):
    return model(x)


@pytest.mark.perf
def test_real_early_exit_cpu_vit12(benchmark):
    """12-block ViT, budget 0.5, batch 256 on CPU: wall-clock speed-up vs MAC speed-up (target wall_rel <=
    macs_rel / 0.8), and batch 1 latency. Exits equal the simulation."""
    from bench.backbones.vit import to_tensor

    model = vit12()
    task, x_uint8 = image_task(model)
    method = create_method("threshold", {"epochs": 20}).fit(task)
    point = method.calibrate(task, [0.5])[0]
    x = to_tensor(x_uint8[-256:], 32)
    result = benchmark.pedantic(lambda: run_early_exit(model, method, point, x, 256), rounds=5, warmup_rounds=1)
    sim = method.decide(method.exit_logits(task.splits["test"]), point)
    assert np.array_equal(result.exits, sim)
    static = np.median(time_call(lambda: static_forward(model, x), "cpu", repeats=5))
    ee = benchmark.stats.stats.median
    macs_rel = (method.costs_[sim] / task.macs.static).mean()
    one = x[:1]
    lat_ee = np.median(time_call(lambda: run_early_exit(model, method, point, one, 1), "cpu", 20))
    lat_static = np.median(time_call(lambda: static_forward(model, one), "cpu", 20))
    assert ee / static < 1.0  # early exit at half the MACs must not be slower than the static backbone
    print(f"\nCPU ({torch.get_num_threads()} threads) batch 256: macs_rel {macs_rel:.3f}, wall_rel "
          f"{ee / static:.3f} (early exit {ee * 1000:.0f} ms, static {static * 1000:.0f} ms); target wall_rel <= "
          f"{macs_rel / 0.8:.3f}. Batch 1: early exit {lat_ee * 1000:.2f} ms, static {lat_static * 1000:.2f} ms "
          f"(sample 0 exits at {sim[-256]})")


def msdnet_cifar_task(n_fit=1024, n_test=256, seed=0):
    """MSDNet's budgeted CIFAR configuration (random weights) with a task from its own exits' features on the
    same structured random images as ``image_task``; its own classifiers are the exit heads."""
    from bench.backbones.vit import exit_head_params, head_params
    from bench.backbones.msdnet import MSDNet, MSDNetConfig
    from bench.pipeline.run import count_macs

    torch.manual_seed(seed)
    model = MSDNet(MSDNetConfig(), in_chans=3, num_classes=10).eval()
    splits, x = image_splits(model, n_fit, n_test, seed)
    w, b = head_params(model)
    return model, Task("images", seed, 10, splits, w, b, count_macs(model), key=f"msdnet-{seed}",
                       backbone="msdnet", exit_heads=exit_head_params(model)), x


@pytest.mark.perf
def test_real_early_exit_cpu_msdnet(benchmark):
    """MSDNet (budgeted CIFAR configuration, 5 exits), budget 0.5, batch 256 on CPU: wall-clock vs MACs, with
    every scale map compacted after each exit. Exits equal the simulation."""
    from bench.backbones.vit import to_tensor

    model, task, x_uint8 = msdnet_cifar_task()
    method = create_method("msdnet").fit(task)
    point = method.calibrate(task, [0.5])[0]
    x = to_tensor(x_uint8[-256:], 32)
    result = benchmark.pedantic(lambda: run_early_exit(model, method, point, x, 256), rounds=5, warmup_rounds=1)
    sim = method.decide(method.exit_logits(task.splits["test"]), point)
    assert np.array_equal(result.exits, sim)
    static = np.median(time_call(lambda: model.static_forward(x), "cpu", repeats=5))
    ee = benchmark.stats.stats.median
    macs_rel = (method.costs_[sim] / task.macs.static).mean()
    print(f"\nMSDNet CPU ({torch.get_num_threads()} threads) batch 256: macs_rel {macs_rel:.3f}, wall_rel "
          f"{ee / static:.3f} (early exit {ee * 1000:.0f} ms, static {static * 1000:.0f} ms), exit shares "
          f"{np.bincount(sim, minlength=5) / len(sim)}")


@pytest.mark.perf
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_real_early_exit_cuda_vit12():
    from bench.backbones.vit import to_tensor

    model = vit12()
    task, x_uint8 = image_task(model)
    method = create_method("threshold", {"epochs": 20}).fit(task)
    point = method.calibrate(task, [0.5])[0]
    model = model.cuda()
    x = to_tensor(x_uint8[-256:], 32).cuda()
    result = run_early_exit(model, method, point, x, 256)
    sim = method.decide(method.exit_logits(task.splits["test"]), point)
    flips = int((result.exits != sim).sum())
    ee = np.median(time_call(lambda: run_early_exit(model, method, point, x, 256), "cuda", 10, 3))
    static = np.median(time_call(lambda: static_forward(model, x), "cuda", 10, 3))
    macs_rel = (method.costs_[sim] / task.macs.static).mean()
    print(f"\n{torch.cuda.get_device_name(0)} batch 256: macs_rel {macs_rel:.3f}, wall_rel {ee / static:.3f}, "
          f"{flips} flipped decisions of 256")
    assert flips <= 3  # TF32/cuBLAS reductions differ from CPU float32; a handful of near-threshold flips


@pytest.mark.perf
def test_feature_cache_vs_backbone_per_batch_jeidnn_epoch(benchmark):
    """One JEI-DNN training epoch (heads and gates, all ten lambdas jointly) on cached features, against the
    same epoch with the frozen 12-block backbone run for every mini-batch. The head/gate work is identical in
    both; the second adds one no-grad backbone pass over the epoch's images, timed on the same images with
    JEI-DNN's batch size. Target: the cache is >= 20x faster."""
    from bench.backbones.vit import block_features, to_tensor

    model = vit12()
    task, x_uint8 = image_task(model, n_fit=2048, n_test=64)
    train_x = x_uint8[:2048]
    jei = create_method("jeidnn", {"epochs": 1, "warmup_epochs": 1})

    t_cache = benchmark.pedantic(lambda: jei.fit(task), rounds=3, warmup_rounds=1)
    t_cache = benchmark.stats.stats.median  # warm-up epoch + one joint epoch, from the cache
    batch = jei.batch_size

    def backbone_pass():
        with torch.no_grad():
            for i in range(0, len(train_x), batch):
                block_features(model, to_tensor(train_x[i:i + batch], 32))

    t_backbone = np.median(time_call(backbone_pass, "cpu", repeats=2, warmup=0))
    # the training above runs the backbone twice over the train split (warm-up epoch and joint epoch)
    speedup = (t_cache + 2 * t_backbone) / t_cache
    print(f"\nJEI-DNN, 2048 train images, 12-block ViT, CPU {torch.get_num_threads()} threads: from cache "
          f"{t_cache:.2f} s (warm-up + 1 joint epoch, 10 lambdas); backbone pass per epoch {t_backbone:.2f} s; "
          f"speed-up {speedup:.0f}x")
    assert speedup > 1
