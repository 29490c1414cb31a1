"""What the device check's sections share: the sizes (the full check and the dry run differ only in sizes), where
the CIFAR-10 archive is looked for, fvcore blocking (the dry run rehearses a lent GPU machine, which has none),
the section exceptions and small helpers."""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.backbones.base import BACKBONES
from bench.measure.flops import fvcore_available

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = Path("data") / "cifar10-jpeg.tar.gz"
# the CUDA tests (``-k cuda`` in these files; they skip without a GPU), in this order; the perf one first: its
# simulation's features come from the CPU in full fp32, and the runner tests' CUDA fixture turns TF32 on for the
# rest of the process, as a --device cuda run does
CUDA_TESTS = ("tests/benchmarks/test_perf.py", "tests/test_runner.py", "tests/test_timing.py")
CUDA_TESTS_SELECT = "cuda"
FAST = {"epochs": 3}  # method fits of runner_vs_simulation (heads and JEI-DNN epochs): the comparison, not accuracy
# the methods the early-exit timing must cover (every deployable method that runs on the ViT is timed)
REQUIRED_TIMED = ("jeidnn", "jeidnn_consistent", "patience", "boostednet", "threshold", "entropy")
TARGET_RATIO = 1.1  # the GPU target: wall_rel <= 1.1 x macs_rel at the timing batch, every method, ViT-S/16-224


@dataclass(frozen=True)
class Sizes:
    """Everything the full check and the dry run do differently: sizes only, never code paths."""

    digits_vit: dict  # runner_vs_simulation's backbone (--set backbone.* fields), on the embedded digits data
    vit_s: dict  # ViT-S/16 at 224 px (throughput, early-exit timing; the dry run: the same timm model, smaller)
    vit_cifar: dict  # the CIFAR-size ViT (throughput, early-exit timing, the CIFAR-10 run)
    train_images: tuple[int, int]  # training images (ViT-S, CIFAR-size); 3 epochs, the first warm-up
    feature_images: tuple[int, int]  # images through compute_features
    ee_fit: tuple[int, int]  # early-exit timing: train (= val = cal) images of the task (ViT-S, CIFAR-size)
    ee_test: tuple[int, int]  # its test images (timed at batch ``timing_batch``)
    ee_b1: int  # images staged for batch 1
    n_latency: int
    timing_batch: int
    method_params: dict  # method -> fit parameters in the early-exit timing (others: their defaults)
    run_epochs: tuple[int, int, float]  # CIFAR-10 run: backbone epochs (min, max, target training seconds)
    run_overhead_s: float  # the run's time besides training (decoding, features, fits, timing, report)
    run_args: tuple[str, ...]  # the run's further arguments
    pytest_timeout: int
    estimate_s: dict  # section -> expected seconds on ``estimate_for`` (printed first; sized by hand)
    estimate_for: str
    time_limit_s: float  # what the check must fit; the CIFAR-10 run trains for what is left of it
    ee_budget: float = 0.5  # the budget timed; a method with no point there takes the next feasible of these:
    ee_fallback_budgets: tuple[float, ...] = (0.6, 0.75, 1.0)
    dtype: str = "fp32"  # timing precision (timing_metrics's dtype, where it takes one)
    compile_check: bool = False  # also time ViT-S/16's training step compiled (bench run --compile)


# JEI-DNN: ``epochs`` is the official num_epoch, warm-up included; warm-up at most 2 epochs leaves at least 6 joint
# epochs (before: 6 against 6 warm-up epochs, 0 or 1 joint). JEI-DNN consistent: ``epochs`` rounds after warm-up.
FULL_METHOD_PARAMS = {"threshold": {"epochs": 20}, "entropy": {"epochs": 20}, "patience": {"epochs": 20},
                      "boostednet": {"epochs": 20}, "jeidnn": {"warmup_epochs": 2, "epochs": 8},
                      "jeidnn_consistent": {"warmup_epochs": 2, "epochs": 6}}
DRY_METHOD_PARAMS = {"threshold": {"epochs": 2}, "entropy": {"epochs": 2}, "patience": {"epochs": 2},
                     "boostednet": {"epochs": 2}, "jeidnn": {"warmup_epochs": 1, "epochs": 2, "lambdas": [0.1, 1.0]},
                     "jeidnn_consistent": {"warmup_epochs": 1, "epochs": 1, "lambdas": [0.1, 1.0]}}

FULL = Sizes(
    digits_vit=dict(img_size=8, patch_size=2, embed_dim=64, depth=6, num_heads=4, epochs=30, batch_size=64,
                    augment="none"),
    vit_s=dict(model="vit_small_patch16_224", img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
               batch_size=128, augment="crop_flip"),
    vit_cifar=dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, batch_size=128,
                   augment="crop_flip"),
    train_images=(4096, 32768), feature_images=(8192, 32768), ee_fit=(512, 4096), ee_test=(2048, 10000), ee_b1=128,
    n_latency=64, timing_batch=256, method_params=FULL_METHOD_PARAMS,
    run_epochs=(2, 15, 50.0), run_overhead_s=100.0,
    run_args=("--budgets", "0.5", "--set", "threshold.epochs=20", "--set", "entropy.epochs=20",
              "--set", "jeidnn.warmup_epochs=2", "--set", "jeidnn.epochs=8"),
    pytest_timeout=300,
    # by hand, not yet measured on an H100 (the JSON records each section's seconds beside these): pytest's start
    # and 13 CUDA tests; a 30-epoch digits ViT and 7 method fits (MSDNet's network trained too); ViT-S/16 (4k
    # images x 3 epochs, bf16) and the CIFAR ViT (33k x 3); two tasks of 6 methods fitted on the CPU (JEI-DNN on
    # 4096 images: ~20 s on 2 busy cores here), each point timed at batch 256 (8 passes) and on 64 single
    # images (~3 ms each); the CIFAR-10 run: 50 s of training, and ~100 s of decoding 60k JPEGs (~10 s), features,
    # fits on 45k images (JEI-DNN 8 epochs: the largest), timing and the report
    estimate_s={"cuda_tests": 60, "runner_vs_simulation": 45, "throughput": 90, "early_exit_timing": 110,
                "cifar10_from_scratch": 150},
    estimate_for="one H100", time_limit_s=480.0, compile_check=True)
DRY = Sizes(
    digits_vit=dict(img_size=8, patch_size=2, embed_dim=16, depth=3, num_heads=2, epochs=2, batch_size=128,
                    augment="none"),
    # ViT-S/16's timm model and code path at 32 px (4 patches), 64 wide and 6 deep: the 224 px, 384-wide,
    # 12-deep network is the full check's
    vit_s=dict(model="vit_small_patch16_224", img_size=32, patch_size=16, embed_dim=64, depth=6, num_heads=2,
               batch_size=32, augment="crop_flip"),
    vit_cifar=dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, batch_size=32, augment="crop_flip"),
    train_images=(64, 128), feature_images=(64, 128), ee_fit=(128, 128), ee_test=(128, 128), ee_b1=8, n_latency=4,
    timing_batch=64, method_params=DRY_METHOD_PARAMS,
    run_epochs=(1, 1, 1.0), run_overhead_s=0.0,
    run_args=("--budgets", "0.5", "--set", "threshold.epochs=2", "--set", "entropy.epochs=2",
              "--set", "jeidnn.epochs=2", "--set", "jeidnn.warmup_epochs=1", "--set", "jeidnn.lambdas=[0.1,1.0]",
              "--timing-batch", "32", "--threads", "1"),
    pytest_timeout=300,
    # measured: 2 CPU cores (20-70 s in all, as busy as they were), one torch thread, fvcore blocked
    estimate_s={"cuda_tests": 8, "runner_vs_simulation": 8, "throughput": 2, "early_exit_timing": 8,
                "cifar10_from_scratch": 8},
    estimate_for="2 CPU cores", time_limit_s=120.0)


class SectionFailed(Exception):
    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial or {}


class SectionSkipped(Exception):
    pass


# ------------------------------------------------------------------------------------------------ the archive

def data_candidates(explicit: str | None = None, env: dict | None = None) -> list[Path]:
    """Where the CIFAR-10 photographs are looked for, in order: ``--data`` (or ``$DATA``) alone when given; else
    ``<repo>/shared/data/cifar10-jpeg.tar.gz`` (a lent GPU machine gets the checkout's ``shared/``), then
    ``<repo>/../shared/data/cifar10-jpeg.tar.gz`` (beside a developer's checkout)."""
    given = explicit or (os.environ if env is None else env).get("DATA")
    if given:
        return [Path(given).expanduser()]
    return [ROOT / "shared" / ARCHIVE, ROOT.parent / "shared" / ARCHIVE]


def find_data(explicit: str | None = None, env: dict | None = None) -> tuple[Path | None, list[Path]]:
    """The first candidate that exists (None if none does), and every candidate looked at."""
    candidates = data_candidates(explicit, env)
    return next((p for p in candidates if p.exists()), None), candidates


# ------------------------------------------------------------------------------------------------ fvcore

FVCORE_MODULES = ("fvcore", "fvcore.nn", "fvcore.nn.jit_handles")


def block_fvcore(folder: Path) -> dict:
    """Make fvcore unimportable in this process (``import fvcore`` raises ImportError) and return the environment
    that does the same in a subprocess: a ``sitecustomize`` first on ``PYTHONPATH``. The dry run's
    ``--no-fvcore``: a lent GPU machine has no fvcore, so the rehearsal has none either."""
    for name in FVCORE_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in FVCORE_MODULES))
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def fvcore_version() -> str | None:
    if not fvcore_available():
        return None
    try:
        from importlib.metadata import version

        return version("fvcore")
    except Exception:  # noqa: BLE001  (importable but no metadata)
        return "unknown"


# ------------------------------------------------------------------------------------------------ helpers

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def vit_config(fields: dict, **changes):
    """A from-scratch ViT config with these fields (only those the plugin's Config has)."""
    plugin = BACKBONES.get("vit")
    names = {f.name for f in dataclasses.fields(plugin.Config)}
    fields = {**fields, **changes, **({"pretrained": False} if "pretrained" in names else {})}
    return dataclasses.replace(plugin.Config(), **{k: v for k, v in fields.items() if k in names})


def synthetic_images(n: int, size: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size, 3] images and labels: each class a fixed random colour pattern (the same for every
    seed) plus per-image noise of random strength, so a network learns something and its confidence varies."""
    templates = torch.rand(classes, 3, size, size, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    noise = torch.rand(n, 3, size, size, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 2
    x = ((templates[y] + noise) / 3 * 255).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(x), y.numpy().astype(np.int64)


def train_dtype(device: str) -> str:
    return "bfloat16 autocast, fp32 master weights, TF32 matmuls" if device.startswith("cuda") else "float32"


def inference_dtype(device: str) -> str:
    return "float32 (TF32 matmuls)" if device.startswith("cuda") else "float32"
