"""Inference cost of timm Vision Transformers and their early exits, in MACs.

Unit and convention
-------------------
The unit is the **MAC** (one multiply-accumulate), the unit of the early-exit literature.  fvcore calls one
multiply-add one "flop", so fvcore's numbers are MACs already; ``torch.utils.flop_counter`` counts FLOPs =
2 x MACs, so its numbers are halved here.  All counts are **per image** (batch of 1).

Counted: the MACs of

* linear layers (``d_in * d_out`` per token; biases are not counted),
* convolutions (the patch embedding: ``C_out * C_in/groups * kh * kw`` per output position; no bias),
* the two attention matmuls, ``Q K^T`` and ``A V`` (``H * N_q * N_k * d_head`` each; a causal mask is
  ignored, i.e. the full square is counted).

Not counted: LayerNorm, softmax, GELU, the ``q * scale``, residual adds, position-embedding adds, token
concatenation, pooling, dropout.  For the ViTs used here these are a few per cent of the total at most
(fvcore would charge LayerNorm 5 per element: ~1.2 % of a tiny D=64 block), and they are where tools
disagree, so leaving them out makes the analytic count, fvcore and the torch counter measure exactly the
same set.

Three counters
--------------
:func:`analytic_vit_macs`
    Closed form from the hyper-parameters read off the module itself.  This is **the arbiter**, and the count
    a ViT run uses where fvcore is not installed (a lent GPU machine has torch and timm but no fvcore).
:func:`fvcore_vit_macs`
    ``fvcore.nn.FlopCountAnalysis`` configured to count exactly the set above: a handle for
    ``aten::scaled_dot_product_attention`` (fvcore has none and would otherwise skip fused attention, only
    logging "unsupported operator"), and ``None`` handles (ignore) for norms and element-wise ops it would
    otherwise count (``layer_norm``: 5 flops/element) or warn about.
:func:`torch_vit_macs`
    ``torch.utils.flop_counter.FlopCounterMode``, FLOPs / 2.  On CPU, fused attention dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's registry does not know (only the
    CUDA kernels are registered), so attention would silently count 0.  We therefore (a) switch timm's
    fused attention off for the duration (``fused_attn = False`` on every module that has the flag, so the
    explicit ``q @ k^T`` / ``attn @ v`` matmuls run), and (b) register the CPU kernel anyway.
    :func:`torch_macs` is the same counter on any module or callable (``fvcore_macs``'s contract): MSDNet's
    count where fvcore is not installed.

Each :class:`ExitMacs` names the counter that produced it (``macs_counter``: ``"analytic"``,
``"fvcore+attention-handle"``, ``"torch.flop_counter"``; not part of equality), so a run can record which one
it used.  :func:`fvcore_available` says whether fvcore can be imported here.

Pitfalls handled
----------------
* fvcore silently skips fused attention (see above): the handle here counts it.
* fvcore's ``set_op_handle(op, None)`` does not override a handle that is already set (the op lands in
  the ignore set but the handle still wins), so its default ``layer_norm`` handle cannot be switched off
  that way; we ``clear_op_handles()`` and install exactly the MAC-bearing handles.  Any remaining
  unsupported op whose name looks MAC-bearing (matmul/bmm/conv/attention/...) raises instead of being
  silently skipped.
* ``torch.jit.trace`` (which fvcore uses) drops computations whose outputs are unused, e.g. early-exit
  heads when a multi-exit function only returns the final logits.  :func:`fvcore_macs` flattens and
  returns *every* tensor the callable produces, so have the callable return every exit.
* Counting never changes the model: training flags (per module) and ``fused_attn`` flags are restored,
  parameters are not touched, and no gradients are recorded.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "ExitMacs",
    "MACS_COUNTERS",
    "analytic_vit_macs",
    "fvcore_available",
    "fvcore_vit_macs",
    "torch_vit_macs",
    "linear_macs",
    "fvcore_macs",
    "torch_macs",
    "attention_macs",
    "fused_attention",
    "FVCORE_IGNORED_OPS",
]


@dataclass(frozen=True)
class ExitMacs:
    """Per-image MACs of a ViT, broken down the way early exits need it."""

    embed: int  # patch embedding conv (per image); MSDNet: its stem
    blocks: tuple[int, ...]  # MACs of each transformer block (per image), len = depth
    head: int  # backbone classifier head Linear(D, C) (per image); final norm not counted
    # MACs to turn block k's output into exit k's feature, for the intermediate exits k < K-1 (empty: free, as
    # the ViT's CLS token after the final LayerNorm). MSDNet: each classifier's convs. Not part of ``static``.
    exit_features: tuple[int, ...] = ()
    # which counter produced the figures (``MACS_COUNTERS``); a label, not a figure: equal counts compare equal
    macs_counter: str = field(default="", compare=False)

    @property
    def static(self) -> int:
        """``embed + sum(blocks) + head``: the static backbone, the denominator of ``macs_rel``."""
        return int(self.embed + sum(self.blocks) + self.head)

    def cumulative_blocks(self) -> np.ndarray:
        """int64 ``[depth]``: ``embed + sum(blocks[:k+1])`` for ``k = 0..depth-1`` (exit heads excluded)."""
        return self.embed + np.cumsum(np.asarray(self.blocks, dtype=np.int64), dtype=np.int64)


#: the ``macs_counter`` labels: the closed form; fvcore with the attention handle of this module; torch's counter
ANALYTIC, FVCORE, TORCH = "analytic", "fvcore+attention-handle", "torch.flop_counter"
MACS_COUNTERS = (ANALYTIC, FVCORE, TORCH)


# --------------------------------------------------------------------------------------------------------
# Closed form
# --------------------------------------------------------------------------------------------------------

def linear_macs(d_in: int, d_out: int, n_tokens: int = 1) -> int:
    """MACs of ``Linear(d_in, d_out)`` applied to ``n_tokens`` tokens (bias not counted)."""
    return int(n_tokens) * int(d_in) * int(d_out)


def attention_macs(n_heads: int, n_q: int, n_k: int, d_head: int, d_value: int | None = None) -> int:
    """MACs of ``Q K^T`` (``H*Nq*Nk*dh``) plus ``A V`` (``H*Nq*Nk*dv``), per image."""
    d_value = d_head if d_value is None else d_value
    return int(n_heads) * int(n_q) * int(n_k) * (int(d_head) + int(d_value))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        assert len(v) == 2, v
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _conv_out_hw(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return hw
        pad = (0, 0)  # "valid"
    else:
        pad = _pair(conv.padding)
    k, s, d = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    return tuple(  # type: ignore[return-value]
        (hw[i] + 2 * pad[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)
    )


def _input_hw(model: nn.Module) -> tuple[int, int]:
    img_size = getattr(model.patch_embed, "img_size", None)
    if img_size is None:
        raise ValueError("model.patch_embed.img_size is None (dynamic size); cannot pick an input size")
    return _pair(img_size)


def _conv_macs(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    out_hw = _conv_out_hw(conv, in_hw)
    kh, kw = _pair(conv.kernel_size)
    per_pos = conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return per_pos * out_hw[0] * out_hw[1], out_hw


def _block_macs(block: nn.Module, n_tokens: int) -> int:
    """Linear layers on every token + the two attention matmuls of a timm ViT ``Block``."""
    attn = block.attn
    n_heads, d_head = int(attn.num_heads), int(attn.head_dim)
    names = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    expected = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    if names != expected or any(isinstance(m, nn.modules.conv._ConvNd) for m in block.modules()):
        raise NotImplementedError(
            f"analytic count supports plain timm ViT blocks (linears {sorted(expected)}); got {sorted(names)}"
        )
    lin = sum(linear_macs(m.in_features, m.out_features, n_tokens)
              for m in block.modules() if isinstance(m, nn.Linear))
    assert attn.qkv.out_features == 3 * n_heads * d_head, (attn.qkv.out_features, n_heads, d_head)
    return lin + attention_macs(n_heads, n_tokens, n_tokens, d_head)


def _head_macs(head: nn.Module) -> int:
    if isinstance(head, nn.Identity):
        return 0
    if isinstance(head, nn.Linear):
        return linear_macs(head.in_features, head.out_features, 1)
    raise NotImplementedError(f"unsupported classifier head {type(head).__name__}")


def analytic_vit_macs(model: nn.Module) -> ExitMacs:
    """Closed-form per-image MACs of a timm ``VisionTransformer`` (the arbiter for the other counters).

    Reads everything from the module: the patch-embedding conv (kernel, stride, padding, channels) at
    ``model.patch_embed.img_size``, the token count ``num_patches + num_prefix_tokens``, each block's linear
    shapes and ``num_heads`` / ``head_dim``, and the head's in/out features.  Assumes the head sees one
    pooled token (``global_pool`` in ``token``/``avg``/``max``/...; attention pooling is refused).
    """
    if getattr(model, "attn_pool", None) is not None:
        raise NotImplementedError("attention-pool ('map') heads are not supported")
    proj = model.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise NotImplementedError(f"patch_embed.proj is {type(proj).__name__}, expected Conv2d")
    embed, grid = _conv_macs(proj, _input_hw(model))
    n_tokens = grid[0] * grid[1] + int(getattr(model, "num_prefix_tokens", 1))
    if getattr(model.patch_embed, "num_patches", grid[0] * grid[1]) != grid[0] * grid[1]:
        raise ValueError(f"patch_embed.num_patches={model.patch_embed.num_patches} but conv grid is {grid}")
    blocks = tuple(_block_macs(b, n_tokens) for b in model.blocks)
    return ExitMacs(embed=int(embed), blocks=blocks, head=_head_macs(model.head), macs_counter=ANALYTIC)


# --------------------------------------------------------------------------------------------------------
# Model-state hygiene
# --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fused_attention(model: nn.Module, enabled: bool | None) -> Iterator[nn.Module]:
    """Temporarily set ``fused_attn`` on every submodule that has it (timm ``Attention`` etc.).

    ``enabled=None`` leaves the flags as they are.  The original flags are restored on exit.
    """
    saved = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        if enabled is not None:
            for m, _ in saved:
                m.fused_attn = bool(enabled)
        yield model
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@contextlib.contextmanager
def _counting_state(module: nn.Module | None, fused: bool | None) -> Iterator[None]:
    """eval mode + no_grad (+ fused_attn override) for the duration; every module's flag restored."""
    if module is None:
        with torch.no_grad():
            yield
        return
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with fused_attention(module, fused), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _example_input(model: nn.Module) -> torch.Tensor:
    h, w = _input_hw(model)
    in_chans = int(model.patch_embed.proj.in_channels)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(1, in_chans, h, w, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------------
# fvcore
# --------------------------------------------------------------------------------------------------------

def _jit_shape(val: Any) -> list[int]:
    shape = val.type().sizes()
    if shape is None:
        raise ValueError(f"fvcore: no static shape for {val}")
    return list(shape)


def _sdpa_fvcore_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention(q, k, v, ...)``: Q K^T + A V MACs (mask/causality ignored)."""
    q, k, v = (_jit_shape(x) for x in inputs[:3])
    *batch, n_q, d_head = q
    n_k, d_value = k[-2], v[-1]
    assert k[-1] == d_head, (q, k)
    return math.prod(batch) * n_q * n_k * (d_head + d_value)


def _fvcore_mac_handles() -> dict[str, Any]:
    """fvcore's own handles for the MAC-bearing ops (its defaults minus norms/upsampling/pooling)."""
    jh = _import_fvcore().jit_handles

    return {
        "aten::addmm": jh.addmm_flop_jit,
        "aten::bmm": jh.bmm_flop_jit,
        "aten::_convolution": jh.conv_flop_jit,
        "aten::einsum": jh.einsum_flop_jit,
        "aten::matmul": jh.matmul_flop_jit,
        "aten::mm": jh.matmul_flop_jit,
        "aten::linear": jh.linear_flop_jit,
    }


#: fvcore ops set to ``None`` (not counted, not warned about): norms and element-wise ops, per the
#: module's convention.  fvcore would count ``layer_norm`` & co and warn about the rest.
FVCORE_IGNORED_OPS: tuple[str, ...] = (
    "aten::layer_norm", "aten::batch_norm", "aten::group_norm", "aten::instance_norm", "aten::rms_norm",
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_",
    "aten::div", "aten::div_", "aten::neg", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::exp",
    "aten::softmax", "aten::log_softmax", "aten::gelu", "aten::silu", "aten::sigmoid", "aten::tanh",
    "aten::erf", "aten::relu", "aten::mean", "aten::sum", "aten::amax", "aten::max",
    "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d", "aten::grid_sampler", "aten::dropout", "aten::feature_dropout",
    "aten::pad", "aten::constant_pad_nd", "aten::repeat", "aten::where", "aten::masked_fill",
)

# Unsupported ops whose names look like real MAC work: refuse to return a count that silently misses them.
_MAC_LIKE = ("attention", "matmul", "bmm", "baddbmm", "addmm", "mm", "conv", "linear", "einsum", "bilinear")

_SDPA = "aten::scaled_dot_product_attention"


def fvcore_available() -> bool:
    """Whether fvcore imports here (not cached: a test may block it for a while)."""
    try:
        _import_fvcore()
    except Exception:  # noqa: BLE001  (not installed, a broken dependency such as iopath, or blocked)
        return False
    return True


def _import_fvcore():
    with warnings.catch_warnings():  # importing fvcore calls the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        import fvcore.nn
        import fvcore.nn.jit_handles  # noqa: F401
    return fvcore.nn


def _fvcore_analysis(module: nn.Module, inputs: tuple, sdpa_handle: bool):
    fca = _import_fvcore().FlopCountAnalysis(module, inputs)
    # Start from no handles: fvcore's set_op_handle(op, None) only adds ``op`` to the ignore set and leaves
    # an existing handle in place -- and handles win -- so ``layer_norm`` cannot be switched off that way.
    fca.clear_op_handles()
    fca.set_op_handle(**_fvcore_mac_handles())
    fca.set_op_handle(**{op: None for op in FVCORE_IGNORED_OPS})
    # sdpa_handle=False reproduces fvcore's stock behaviour (fused attention counts 0) -- for tests only.
    fca.set_op_handle(_SDPA, _sdpa_fvcore_handle if sdpa_handle else None)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fca.ancestor_mode("owner")
    fca.total()  # run the trace now, inside the caller's state context
    unsupported = dict(fca.unsupported_ops())
    missed = {op: n for op, n in unsupported.items() if any(t in op.split("::")[-1] for t in _MAC_LIKE)}
    if missed:
        raise RuntimeError(f"fvcore has no handle for MAC-bearing ops {missed}; the count would be low")
    if unsupported:
        warnings.warn(f"fvcore: ops not counted (assumed negligible): {unsupported}", stacklevel=3)
    return fca


def _modules_of(fn: Callable[..., Any]) -> list[nn.Module]:
    """Modules a callable uses that tracing must see as parameters: itself, ``__self__`` of a bound method,
    ``functools.partial`` arguments, and closure cells (one level)."""
    if isinstance(fn, nn.Module):
        return [fn]
    found: list[Any] = [getattr(fn, "__self__", None)]
    if isinstance(fn, functools.partial):
        found += [fn.func, *fn.args, *fn.keywords.values(), *_modules_of(fn.func)]
    for cell in getattr(fn, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # empty cell
            found.append(cell.cell_contents)
    out: list[nn.Module] = []
    for m in found:
        if isinstance(m, nn.Module) and not any(m is o for o in out):
            out.append(m)
    return out


class _AllOutputs(nn.Module):
    """Wraps a callable so that every tensor it returns (any nesting) is an output of the trace."""

    def __init__(self, fn: Callable[..., Any], modules: list[nn.Module]):
        super().__init__()
        # Registered, so their parameters are trace inputs rather than constants (jit refuses to bake a
        # tensor that requires grad into the graph).
        self.used = nn.ModuleList(modules)
        self.__dict__["_fn"] = fn  # not registered a second time

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        leaves, _ = torch.utils._pytree.tree_flatten(self._fn(*args))
        tensors = tuple(t for t in leaves if isinstance(t, torch.Tensor))
        if not tensors:
            raise ValueError("the traced callable returned no tensors")
        return tensors


def fvcore_macs(fn_or_module: Callable[..., Any] | nn.Module, inputs: Any, *, sdpa_handle: bool = True) -> int:
    """Total per-call MACs of a module or plain callable under fvcore, with the attention handle.

    Every tensor output (nested lists/tuples/dicts are flattened) is kept as an output of the trace, so
    ``torch.jit.trace`` cannot drop early-exit heads -- but only if the callable *returns* them.  ``inputs``
    is a tensor or a tuple of tensors; pass a batch of 1 for per-image counts.  The modules a plain
    callable uses are found from a bound method's ``__self__``, ``functools.partial`` arguments and its
    closure; a callable reaching modules some other way (globals) should be wrapped in an ``nn.Module``.
    Found modules are put in eval mode / no_grad for the count and their flags restored.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    modules = _modules_of(fn_or_module)
    wrapper = _AllOutputs(fn_or_module, modules)
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(_counting_state(m, None))
        with torch.no_grad():
            return int(_fvcore_analysis(wrapper, inputs, sdpa_handle).total())


def _split(model: nn.Module, per_module: dict[str, int], total: int, tool: str) -> ExitMacs:
    depth = len(model.blocks)
    out = ExitMacs(
        embed=int(per_module.get("patch_embed", 0)),
        blocks=tuple(int(per_module.get(f"blocks.{i}", 0)) for i in range(depth)),
        head=int(per_module.get("head", 0)),
        macs_counter=tool,
    )
    if out.static != int(total):
        outside = int(total) - out.static
        raise RuntimeError(f"{tool}: {outside} MACs outside patch_embed/blocks/head ({per_module})")
    return out


def fvcore_vit_macs(model: nn.Module, *, sdpa_handle: bool = True, fused_attn: bool | None = None) -> ExitMacs:
    """Per-image MACs of a timm ViT by fvcore (batch of 1 at the model's own input size).

    Attention is counted by the ``aten::scaled_dot_product_attention`` handle when timm's fused attention is
    on, and by fvcore's ``aten::matmul`` handle when it is off; ``fused_attn`` forces either for the call
    (``None``: leave the model's flags).  ``sdpa_handle=False`` reproduces stock fvcore (fused attention
    silently uncounted) and exists only to demonstrate that pitfall.
    """
    with _counting_state(model, fused_attn):
        fca = _fvcore_analysis(model, (_example_input(model),), sdpa_handle)
        return _split(model, dict(fca.by_module()), fca.total(), FVCORE if sdpa_handle else "fvcore")


# --------------------------------------------------------------------------------------------------------
# torch.utils.flop_counter
# --------------------------------------------------------------------------------------------------------

def _torch_sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs (2 x MACs) of Q K^T + A V for an sdpa kernel called as ``(q, k, v, ...)``."""
    *batch, n_q, d_head = query_shape
    n_k, d_value = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * n_q * n_k * (d_head + d_value)


def _torch_custom_mapping() -> dict[Any, Any]:
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    # CPU fused attention kernel; torch only registers the CUDA sdpa kernels.
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _torch_sdpa_flops
    return mapping


def torch_vit_macs(model: nn.Module, *, unfuse_attention: bool = True) -> ExitMacs:
    """Per-image MACs of a timm ViT by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).

    By default timm's fused attention is switched off for the call (restored afterwards) so the counter
    sees the explicit attention matmuls; the CPU sdpa kernel is registered as well, so
    ``unfuse_attention=False`` also counts attention (CPU and CUDA).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with _counting_state(model, False if unfuse_attention else None):
        x = _example_input(model)
        counter = FlopCounterMode(display=False, custom_mapping=_torch_custom_mapping())
        with counter:
            model(x)
    flops = counter.get_flop_counts()
    total = counter.get_total_flops()
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for name in ["patch_embed", "head", *(f"blocks.{i}" for i in range(len(model.blocks)))]:
        f = sum(flops.get(f"{root}.{name}", {}).values())
        assert f % 2 == 0, (name, f)
        per_module[name] = f // 2
    assert total % 2 == 0, total
    return _split(model, per_module, total // 2, TORCH)


def torch_macs(fn_or_module: Callable[..., Any] | nn.Module, inputs: Any) -> int:
    """Total per-call MACs of a module or plain callable by ``FlopCounterMode`` (FLOPs / 2): ``fvcore_macs``'s
    contract (inputs a tensor or a tuple; the modules found are put in eval mode / no_grad and their flags
    restored) without fvcore, e.g. MSDNet's parts where fvcore is not installed. Every op the callable runs is
    counted (nothing is traced, so no output can be dropped); timm's fused attention is switched off for the
    call so its matmuls are counted, and the CPU sdpa kernel is registered. It counts convolutions and matrix
    products as fvcore's handles here do, so the two agree on convolutional networks (tested on MSDNet)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with contextlib.ExitStack() as stack:
        for m in _modules_of(fn_or_module):
            stack.enter_context(_counting_state(m, False))
        counter = FlopCounterMode(display=False, custom_mapping=_torch_custom_mapping())
        with torch.no_grad(), counter:
            fn_or_module(*inputs)
    total = counter.get_total_flops()
    assert total % 2 == 0, total
    return int(total // 2)
