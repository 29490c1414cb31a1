"""Real-size runs (minutes): the figures the README quotes, as assertions. Not in the default suite:
run them with ``.venv/bin/python -m pytest -m slow``."""
import json

import pytest

from bench.cli import main
from bench.results.files import read_metrics


def _run(tmp_path, dataset, *extra, methods="threshold,entropy"):
    out = tmp_path / "out"
    assert main(["run", "--methods", methods, "--dataset", dataset, "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out), *extra]) == 0
    df = read_metrics(out)
    return df[(df.split == "test") & df.exit.isna()], json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_digits_default_run(tmp_path):
    df, run = _run(tmp_path, "digits")
    static = df[(df.method == "static") & (df.metric == "accuracy")]["value"].item()
    assert static >= 0.93
    low = df[(df.method == "threshold") & (df.budget == 0.25)].set_index("metric")["value"]
    assert low["macs_rel"] < 0.35 and low["accuracy"] > 0.8


@pytest.mark.slow
def test_fashion_mnist_default_run(tmp_path):
    from bench.base.errors import UserError
    from datasets import load_dataset

    try:
        load_dataset("fashion-mnist", download=False)
    except UserError as e:
        pytest.skip(f"Fashion-MNIST files not present: {e}")
    df, run = _run(tmp_path, "fashion-mnist")
    assert df[(df.method == "static") & (df.metric == "accuracy")]["value"].item() >= 0.87
    assert run["seeds"]["0"]["backbone_train_seconds"] < 15 * 60


@pytest.mark.slow
def test_digits_msdnet_run(tmp_path):
    """The default digits MSDNet (README): its static accuracy, and MSDNet's protocol and BoostedNet on it."""
    df, run = _run(tmp_path, "digits", "--backbone", "msdnet", methods="msdnet,boostednet,threshold")
    assert df[(df.method == "static") & (df.metric == "accuracy")]["value"].item() >= 0.97
    for method in ("msdnet", "boostednet"):
        low = df[(df.method == method) & (df.budget == 0.5)].set_index("metric")["value"]
        assert low["macs_rel"] < 0.6 and low["accuracy"] > 0.95
