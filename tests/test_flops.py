"""Tests for bench.measure.flops: analytic MACs are the arbiter; fvcore and torch's counter must agree with them."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.backbones.msdnet import MSDNET_DEFAULTS, MSDNetBackbone, MSDNetConfig  # noqa: E402
from bench.backbones.vit import ViT  # noqa: E402
from bench.measure.flops import (  # noqa: E402
    MACS_COUNTERS,
    ExitMacs,
    analytic_vit_macs,
    fused_attention,
    fvcore_available,
    fvcore_macs,
    fvcore_vit_macs,
    linear_macs,
    torch_macs,
    torch_vit_macs,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

CONFIGS = {
    # digits-like: 8x8 grey, patch 2 -> 16 patches
    "tiny8": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=6, num_heads=4),
    # MNIST-like: 28x28 grey, patch 7 -> 16 patches
    "mnist28": dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4),
    # CIFAR-like: 32x32 RGB, patch 4 -> 64 patches, ViT-Ti width, 12 blocks
    "cifar32": dict(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=12, num_heads=3),
}
NUM_CLASSES = 10


def make_vit(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, **CONFIGS[name])


@pytest.fixture(scope="module", params=list(CONFIGS))
def counted(request):
    model = make_vit(request.param)
    return request.param, model, analytic_vit_macs(model)


def rel_err(x: int, ref: int) -> float:
    return abs(x - ref) / ref


# ---------------------------------------------------------------------------------------------- analytic

def test_analytic_tiny_by_hand():
    D, C, depth, heads, mlp_ratio = 64, 10, 6, 4, 4
    n_patches = (8 // 2) * (8 // 2)  # 16
    N = n_patches + 1  # + CLS token = 17
    embed = n_patches * (1 * 2 * 2 * 64)  # conv: per output position C_in*kh*kw*C_out = 256; x16 = 4096
    block = (
        N * D * 3 * D  # qkv            17*64*192 = 208896
        + 2 * N * N * D  # QK^T and AV   2*17*17*64 = 36992 (heads*dh = D)
        + N * D * D  # attn proj         17*64*64 = 69632
        + 2 * N * D * mlp_ratio * D  # fc1 + fc2  2*17*64*256 = 557056
    )
    head = D * C  # 640
    assert embed == 4096 and block == 872576 and head == 640
    model = make_vit("tiny8")
    assert model.blocks[0].attn.num_heads == heads
    macs = analytic_vit_macs(model)
    assert macs == ExitMacs(embed=embed, blocks=(block,) * depth, head=head)
    assert macs.static == embed + depth * block + head == 5240192
    cum = macs.cumulative_blocks()
    assert cum.dtype == np.int64 and cum.shape == (depth,)
    np.testing.assert_array_equal(cum, embed + block * np.arange(1, depth + 1))
    assert cum[-1] + head == macs.static


def test_linear_macs():
    assert linear_macs(64, 10) == 640
    assert linear_macs(64, 192, n_tokens=17) == 17 * 64 * 192


def test_analytic_reads_prefix_tokens():
    """Register tokens count as tokens: N = patches + CLS + 4 registers."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                              reg_tokens=4, **CONFIGS["tiny8"])
    N, D = 16 + 1 + 4, 64
    assert analytic_vit_macs(model).blocks[0] == 12 * N * D * D + 2 * N * N * D
    assert rel_err(fvcore_vit_macs(model).static, analytic_vit_macs(model).static) == 0


# ---------------------------------------------------------------------------- fvcore / torch vs analytic

@pytest.mark.parametrize("counter", [fvcore_vit_macs, torch_vit_macs], ids=["fvcore", "torch"])
def test_counter_matches_analytic(counted, counter):
    name, model, ref = counted
    got = counter(model)
    assert len(got.blocks) == len(ref.blocks)
    assert rel_err(got.embed, ref.embed) < 0.01, (name, got.embed, ref.embed)
    for i, (g, r) in enumerate(zip(got.blocks, ref.blocks)):
        assert rel_err(g, r) < 0.01, (name, i, g, r)
    assert rel_err(got.head, ref.head) < 0.01
    assert rel_err(got.static, ref.static) < 0.01
    # With the convention (norms/elementwise ignored) the agreement is in fact exact.
    assert got == ref


@pytest.mark.parametrize("fused", [True, False])
def test_fvcore_and_torch_independent_of_fused_flag(counted, fused):
    name, model, ref = counted
    assert fvcore_vit_macs(model, fused_attn=fused) == ref
    assert torch_vit_macs(model, unfuse_attention=not fused) == ref


# ---------------------------------------------------------------------------------------------- pitfalls

def test_fvcore_without_sdpa_handle_undercounts_blocks():
    """Stock fvcore skips aten::scaled_dot_product_attention: removing the handle must be caught."""
    model = make_vit("tiny8")
    assert all(b.attn.fused_attn for b in model.blocks)  # timm's default in this environment
    ref = analytic_vit_macs(model)
    bare = fvcore_vit_macs(model, sdpa_handle=False)
    assert bare.blocks[0] < ref.blocks[0] * 0.99
    assert ref.blocks[0] - bare.blocks[0] == 2 * 17 * 17 * 64  # exactly the two attention matmuls
    assert fvcore_vit_macs(model).blocks[0] == ref.blocks[0]


def test_torch_counter_misses_fused_attention_on_cpu():
    """Plain FlopCounterMode on CPU with fused attention misses attention -- what torch_vit_macs guards against."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_vit("tiny8").eval()
    ref = analytic_vit_macs(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    raw_block = sum(counter.get_flop_counts()["VisionTransformer.blocks.0"].values()) // 2
    assert raw_block < ref.blocks[0] * 0.99
    assert torch_vit_macs(model).blocks[0] == ref.blocks[0]


class MultiExit(nn.Module):
    """Backbone + internal-classifier heads after blocks 0..depth-2 (CLS token after model.norm)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        D = vit.embed_dim
        self.heads = nn.ModuleList(nn.Linear(D, NUM_CLASSES) for _ in range(len(vit.blocks) - 1))

    def forward(self, x: torch.Tensor, all_exits: bool = True):
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        exits = []
        for k, block in enumerate(v.blocks):
            x = block(x)
            if k < len(self.heads):
                exits.append(self.heads[k](v.norm(x)[:, 0]))
        exits.append(v.forward_head(v.norm(x)))
        return exits if all_exits else exits[-1]


def test_multi_exit_trace_counts_every_head():
    vit = make_vit("tiny8")
    me = MultiExit(vit)
    x = torch.zeros(1, 1, 8, 8)
    D, C = 64, NUM_CLASSES
    backbone = fvcore_macs(vit, x)
    assert backbone == analytic_vit_macs(vit).static
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "op not counted" warnings either
        all_exits = fvcore_macs(me, x)
    assert all_exits - backbone == 5 * D * C
    # The pitfall: return only the final exit and the trace drops the five heads.
    assert fvcore_macs(lambda t: me(t, all_exits=False), x) == backbone
    # A plain callable returning a dict of exits is flattened: all heads kept.
    assert fvcore_macs(lambda t: {f"exit{k}": e for k, e in enumerate(me(t))}, x) == all_exits


def test_fvcore_macs_sees_sdpa_in_generic_callable():
    model = make_vit("tiny8")
    x = torch.zeros(1, 1, 8, 8)
    assert fvcore_macs(model, x) - fvcore_macs(model, x, sdpa_handle=False) == 6 * 2 * 17 * 17 * 64


# ---------------------------------------------------------------------------------------------- hygiene

def test_model_state_unchanged():
    model = make_vit("mnist28")
    model.train()
    model.blocks[1].eval()  # mixed per-module modes must come back exactly
    flags = [True, False, True, False, False, True]
    for b, f in zip(model.blocks, flags):
        b.attn.fused_attn = f
    modes = {n: m.training for n, m in model.named_modules()}
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}

    analytic_vit_macs(model)
    fvcore_vit_macs(model)
    fvcore_vit_macs(model, fused_attn=False)
    torch_vit_macs(model)
    torch_vit_macs(model, unfuse_attention=False)
    fvcore_macs(model, torch.zeros(1, 1, 28, 28))

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert [b.attn.fused_attn for b in model.blocks] == flags
    state = model.state_dict()
    assert state.keys() == params.keys()
    for k, v in params.items():
        assert torch.equal(state[k], v), k
    assert all(p.grad is None for p in model.parameters())


def test_fused_attention_context_restores_on_error():
    model = make_vit("tiny8")
    with pytest.raises(RuntimeError):
        with fused_attention(model, False):
            assert not any(b.attn.fused_attn for b in model.blocks)
            raise RuntimeError
    assert all(b.attn.fused_attn for b in model.blocks)


# ---------------------------------------------------------------------------------------------- without fvcore
# A lent GPU machine has torch and timm but no fvcore: every backbone's ``macs`` (called by every task build) must
# still count, with the counter it used named on the result.

def block_fvcore(monkeypatch):
    """fvcore unimportable for the test (``import fvcore`` raises ImportError), as where it is not installed."""
    for name in ("fvcore", "fvcore.nn", "fvcore.nn.jit_handles"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not fvcore_available()


def test_each_counter_names_itself_and_the_name_is_not_part_of_equality():
    model = make_vit("tiny8")
    counts = {c.macs_counter: c for c in (analytic_vit_macs(model), fvcore_vit_macs(model), torch_vit_macs(model))}
    assert sorted(counts) == sorted(MACS_COUNTERS)
    assert len({c for c in counts.values()}) == 1  # the same figures: equal, whatever the label


@pytest.mark.parametrize("name", ["tiny8", "cifar32"])
def test_vit_macs_without_fvcore_is_the_analytic_count(monkeypatch, name):
    model = make_vit(name)
    with_fvcore = ViT.macs(model)
    assert with_fvcore.macs_counter == "fvcore+attention-handle"
    block_fvcore(monkeypatch)
    without = ViT.macs(model)
    assert without.macs_counter == "analytic"
    assert without == analytic_vit_macs(model)
    # the tolerance is 1 %; with the module's convention the two agree exactly
    assert rel_err(without.static, with_fvcore.static) < 0.01 and without == with_fvcore


@pytest.mark.parametrize("cfg", [MSDNET_DEFAULTS["digits"], MSDNetConfig(img_size=32, n_blocks=3, channels=8,
                                                                         growth_rate=4, classifier_channels=16)],
                         ids=["digits", "cifar32-small"])
def test_msdnet_macs_without_fvcore_counts_the_same_parts_with_torchs_counter(monkeypatch, cfg):
    """MSDNet has no closed form here: torch's counter (FLOPs / 2) on the same parts. It counts convolutions and
    linear layers as fvcore's handles do, so the tolerance stated is 0: every part equal."""
    torch.manual_seed(0)
    model = MSDNetBackbone.create(cfg, in_chans=3, num_classes=10).eval()
    with_fvcore = MSDNetBackbone.macs(model)
    assert with_fvcore.macs_counter == "fvcore+attention-handle"
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included
    block_fvcore(monkeypatch)
    without = MSDNetBackbone.macs(model)
    assert without.macs_counter == "torch.flop_counter"
    assert without == with_fvcore and without.exit_features == with_fvcore.exit_features
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_torch_macs_equals_fvcore_macs_on_a_callable_with_attention():
    model = make_vit("tiny8")
    me = MultiExit(model)
    x = torch.zeros(1, 1, 8, 8)
    assert me.training
    assert torch_macs(me, x) == fvcore_macs(me, x)
    assert torch_macs(lambda t: me(t)[-1], x) == fvcore_macs(me, x)  # nothing traced: no output dropped
    assert all(b.attn.fused_attn for b in model.blocks) and me.training  # flags restored
