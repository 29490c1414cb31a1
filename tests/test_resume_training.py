"""An interrupted backbone training resumes from its last finished epoch and ends with exactly the weights, best
epoch and history of an uninterrupted one (every network: its optimiser, shuffle and augmentation draws, per-step
and per-epoch schedules); a damaged or foreign state is never used; the state is gone once the checkpoint is
written."""
import dataclasses
import shutil

import pytest
import torch

import methods.sdn  # noqa: F401  (registers vit-sdn and msdnet-sdn)
from bench.backbones import base as base_module
from bench.backbones import resume
from bench.backbones.base import BACKBONES
from bench.backbones.msdnet import MSDNetConfig
from bench.backbones.vit import ViTConfig
from bench.pipeline.backbone_cache import checkpoint_path, partial_path
from bench.pipeline.resources import _seconds_here
from bench.pipeline.splits import make_splits
from bench.pipeline.tasks import backbone_key, load_or_train_backbone
from datasets import load_dataset

VIT = dict(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, epochs=4, batch_size=128,
           augment="crop_flip", warmup_epochs=1.0)
# SGD with lr / 10 after epochs 2 and 3: a per-epoch schedule (after_epoch) that the resume must replay
MSD = dict(img_size=8, n_blocks=3, channels=4, growth_rate=2, classifier_channels=16, epochs=4, batch_size=128,
           lr=0.05, augment="none")
NETWORKS = {"vit": VIT, "vit-sdn": VIT, "msdnet": MSD, "msdnet-sdn": MSD}


class Killed(BaseException):
    """What a kill between two epochs leaves behind: the state of the epoch before, and no checkpoint."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _config(network: str):
    plugin = BACKBONES.get(network)
    return plugin, plugin.Config(**NETWORKS[network])


def _kill_after(monkeypatch, finished: int) -> None:
    real = resume.TrainingState.save

    def save(self, state):
        real(self, state)
        if state["finished_epochs"] == finished:
            raise Killed
    monkeypatch.setattr(resume.TrainingState, "save", save)


def _count_epochs(monkeypatch) -> list:
    calls, real = [], base_module.epoch_draws
    monkeypatch.setattr(base_module, "epoch_draws", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _assert_same_training(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a.best_epoch, a.val_accuracy) == (b.best_epoch, b.val_accuracy)

    def strip(history):
        return [{k: v for k, v in e.items() if k not in ("seconds", "resumed_from")} for e in history]
    assert strip(a.history) == strip(b.history)


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_an_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path, digits, monkeypatch, network):
    plugin, cfg = _config(network)
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    whole = load_or_train_backbone(tmp_path / "whole", plugin, cfg, digits, splits)
    with monkeypatch.context() as m:
        _kill_after(m, 2)
        with pytest.raises(Killed):
            load_or_train_backbone(tmp_path / "cut", plugin, cfg, digits, splits)
    (state,) = (tmp_path / "cut" / "backbones").glob("*.partial")
    assert not list((tmp_path / "cut" / "backbones").glob("*.pt"))
    epochs = _count_epochs(monkeypatch)
    resumed = load_or_train_backbone(tmp_path / "cut", plugin, cfg, digits, splits)
    assert len(epochs) == 2  # only the epochs the killed process had not finished
    _assert_same_training(resumed, whole)
    assert [e.get("resumed_from") for e in resumed.history] == [None, None, 2, 2]
    assert not state.exists() and len(list((tmp_path / "cut" / "backbones").glob("*.pt"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "another configuration"])
def test_a_damaged_or_foreign_state_is_not_used(tmp_path, digits, monkeypatch, caplog, damage):
    plugin, cfg = _config("vit")
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    whole = load_or_train_backbone(tmp_path / "whole", plugin, cfg, digits, splits)
    other = dataclasses.replace(cfg, lr=0.002)
    with monkeypatch.context() as m:
        _kill_after(m, 2)
        with pytest.raises(Killed):
            load_or_train_backbone(tmp_path / "cut", plugin, other if damage != "truncated" else cfg, digits, splits)
    (state,) = (tmp_path / "cut" / "backbones").glob("*.partial")
    key = backbone_key(plugin, cfg, digits.name, splits.sha256, splits.seed, digits.source)
    target = partial_path(checkpoint_path(tmp_path / "cut", plugin, digits.name, key))
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:  # another configuration's state under this configuration's name
        shutil.move(state, target)
    epochs = _count_epochs(monkeypatch)
    retrained = load_or_train_backbone(tmp_path / "cut", plugin, cfg, digits, splits)
    assert "unusable" in caplog.text and len(epochs) == cfg.epochs
    _assert_same_training(retrained, whole)
    assert all("resumed_from" not in e for e in retrained.history) and not target.exists()


@dataclasses.dataclass
class _Recipe:
    epochs: int = 4
    batch_size: int = 128
    img_size: int = 8
    augment: str = "crop_flip"


def _train_with_dropout(digits, state_path):
    """A network with dropout (draws from torch's global generator at every step), trained by fit_epochs inside
    a resumable context."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Dropout(0.5),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = digits.train_x[:600], digits.train_y[:600]

    def validate():
        with torch.no_grad():
            model.eval()
            acc = float((model(base_module.to_tensor(x[:100], 8)).argmax(1).numpy() == y[:100]).mean())
            model.train()
        return acc, {}

    with resume.resumable_training(state_path, "dropout"):
        model, *_ = base_module.fit_epochs(model, opt, _Recipe(), x, y, 0, "cpu", "dropout",
                                           lambda xb, yb: torch.nn.functional.cross_entropy(model(xb), yb),
                                           validate)
    return model.state_dict()


def test_a_network_with_dropout_resumes_with_torch_s_generator(tmp_path, digits, monkeypatch):
    whole = _train_with_dropout(digits, tmp_path / "whole.partial")
    with monkeypatch.context() as m:
        _kill_after(m, 2)
        with pytest.raises(Killed):
            _train_with_dropout(digits, tmp_path / "cut.partial")
    resumed = _train_with_dropout(digits, tmp_path / "cut.partial")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_long_training_says_a_rerun_resumes_it(tmp_path, digits, monkeypatch, capsys):
    monkeypatch.setattr(base_module, "ESTIMATE_ABOVE_S", 0.0)
    plugin, cfg = _config("vit")
    load_or_train_backbone(tmp_path, plugin, cfg, digits, make_splits(digits.train_y, len(digits.test_y), 0))
    out = capsys.readouterr()
    assert "4 epochs x" in out.out + out.err
    assert "the same command resumes it after its last finished epoch" in out.out + out.err


def test_only_the_first_training_in_a_context_is_resumable(tmp_path):
    with resume.resumable_training(tmp_path / "x.partial", "k") as state:
        assert resume.claim() == state and resume.claim() is None
    assert resume.claim() is None


def test_seconds_of_this_process_exclude_the_epochs_an_earlier_one_trained():
    fresh = [{"seconds": 10.0}, {"seconds": 20.0}, {"seconds": 35.0}]
    assert _seconds_here(fresh) == 35.0
    resumed = [{"seconds": 10.0}, {"seconds": 20.0}, {"seconds": 35.0, "resumed_from": 2},
               {"seconds": 50.0, "resumed_from": 2}]
    assert _seconds_here(resumed) == 30.0  # epochs 2 and 3, after epoch 1 ended at 20 s
    twice = [*resumed[:3], {"seconds": 44.0, "resumed_from": 3}]
    assert _seconds_here(twice) == 9.0
    assert _seconds_here([]) == 0.0
