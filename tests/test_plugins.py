"""Extending the harness from outside it: a new method and a new backbone (a timm CNN with pooled stage features),
both defined in this file, registered, and run through ``bench check`` and ``bench run`` without touching the
harness's code."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet

from bench.backbones.base import BACKBONES, Backbone, Heads, fit_epochs, register_backbone, to_tensor
from bench.base.fields import bounded
from bench.cli import main
from bench.core.interface import METHODS, register_method
from bench.measure.flops import ExitMacs, fvcore_macs, linear_macs
from bench.results.files import read_metrics
from methods.threshold import MaxSoftmaxThreshold


# -- a new method: one small file's worth --------------------------------------------------------------------
@dataclass
class MarginGate(MaxSoftmaxThreshold):
    """Leave when the top-1 minus top-2 softmax probability reaches the threshold."""

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        top2 = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]

    def decision_macs(self, num_classes: int) -> int:
        return 3 * num_classes


# -- a new backbone: a timm ResNet whose exits are its pooled stages ------------------------------------------
@dataclass
class TinyResNetConfig:
    img_size: int = bounded(8, min=4)
    width: int = bounded(8, min=1)  # channels of the first stage; doubled per stage
    epochs: int = bounded(2, min=1)
    batch_size: int = bounded(64, min=1)
    lr: float = bounded(3e-3, min=0.0)
    augment: str = "none"
    eval_batch_size: int = bounded(256, min=1)


class ResNetStages:
    """Exit k: stage k's map, average-pooled and zero-padded to the last stage's width (one feature width for
    every exit; a head on the padded feature equals a head on the unpadded one)."""

    def __init__(self, model: ResNet):
        self.model = model
        self.layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        self.num_exits = len(self.layers)
        self.dim = model.fc.in_features

    def embed(self, x):
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def block(self, k, h):
        return self.layers[k](h)

    def exit_feature(self, k, h):
        f = h.mean((2, 3))
        return F.pad(f, (0, self.dim - f.shape[1]))

    @staticmethod
    def select(h, keep):
        return h[keep]

    def static_forward(self, x):
        return self.model(x)


class TinyResNet(Backbone):
    """A 4-stage timm ResNet (one BasicBlock per stage), trained from scratch."""

    Config = TinyResNetConfig

    @classmethod
    def create(cls, cfg, in_chans, num_classes, load_weights=True):
        w = cfg.width
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans,
                      channels=(w, 2 * w, 4 * w, 8 * w), stem_width=w)

    @classmethod
    def train(cls, cfg, train_x, train_y, val_x, val_y, num_classes, seed, device="cpu", desc="resnet"):
        torch.manual_seed(seed)
        model = cls.create(cfg, train_x.shape[-1], num_classes).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

        def validate():
            model.eval()
            with torch.no_grad():
                pred = model(to_tensor(val_x, cfg.img_size)).argmax(1).numpy()
            return float((pred == val_y).mean()), {}

        return fit_epochs(model, opt, cfg, train_x, train_y, seed, device, desc,
                          lambda xb, yb: F.cross_entropy(model(xb), yb), validate)

    @classmethod
    def stages(cls, model):
        return ResNetStages(model)

    @classmethod
    def macs(cls, model):
        st = ResNetStages(model)
        x = torch.zeros(1, model.conv1.in_channels, 8, 8)
        with torch.no_grad():
            embed = fvcore_macs(st.embed, x)
            h, blocks = st.embed(x), []
            for k in range(st.num_exits):
                blocks.append(fvcore_macs(st.layers[k], h))
                h = st.block(k, h)
        return ExitMacs(embed=embed, blocks=tuple(blocks), head=linear_macs(model.fc.in_features,
                                                                            model.fc.out_features))

    @classmethod
    def heads(cls, model):
        return Heads(model.fc.weight.detach().float(), model.fc.bias.detach().float())

    @classmethod
    def label(cls, cfg):
        return f"tiny-resnet-w{cfg.width}-{cfg.img_size}px"


@pytest.fixture
def plugins():
    register_method("margin-test")(MarginGate)
    register_backbone("tiny-resnet-test")(TinyResNet)
    yield
    METHODS.unregister("margin-test")
    BACKBONES.unregister("tiny-resnet-test")


def test_a_new_method_passes_the_conformance_suite(plugins, capsys):
    assert main(["check", "margin-test"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 11 and "FAIL" not in out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_new_method_and_a_new_backbone_run_end_to_end(plugins, tmp_path):
    rc = main(["run", "--methods", "margin-test,threshold", "--backbone", "tiny-resnet-test", "--budgets", "0.5,1.0",
               "--set", "margin-test.epochs=5", "--set", "threshold.epochs=5", "--set", "backbone.epochs=1",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert rc == 0
    df = read_metrics(tmp_path / "out")
    assert set(df["method"]) == {"static", "margin-test", "threshold"}
    assert set(df["backbone"]) == {"tiny-resnet-w8-8px"}
    test = df[(df.split == "test") & df.exit.isna()]
    static_macs = test[(test.method == "static") & (test.metric == "macs")]["value"].item()
    # the last exit costs the whole network plus the heads and decisions on the way
    for method in ("margin-test", "threshold"):
        rows = test[(test.method == method) & (test.budget == 1.0)].set_index("metric")["value"]
        assert 0.0 <= rows["accuracy"] <= 1.0 and rows["macs"] <= static_macs * 1.01
        half = test[(test.method == method) & (test.budget == 0.5) & (test.metric == "macs_rel")]["value"]
        assert half.item() < 0.75 or np.isnan(half.item())
    assert pd.notna(test[(test.method == "static") & (test.metric == "accuracy")]["value"].item())
