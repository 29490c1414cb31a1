"""The README is a product page, and the results pages hold no hand-typed number: regenerating them from the
committed run folders gives the committed text."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from bench.results.page import build_page

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 12_000, len(text)
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in block] == [["make", "demo"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_results_page_regenerates_from_the_run_folders(tmp_path, monkeypatch):
    page = ROOT / "results" / "README.md"
    committed = page.read_text(encoding="utf-8")
    first = committed.splitlines()[0]
    command = shlex.split(first.split("`")[3])  # python -m bench report DIR... --page results/README.md
    dirs = command[4:command.index("--page")]
    assert dirs and all((ROOT / d / "metrics.csv").is_file() and (ROOT / d / "run.json").is_file() for d in dirs)
    monkeypatch.chdir(ROOT)  # the page names its run folders relative to the repository
    out = tmp_path / "results" / "README.md"
    assert build_page(dirs, out, draw=False) == [out]  # the text alone: drawing is tested in test_report
    regenerated = out.read_text(encoding="utf-8").splitlines()
    # the first line names the page's own path; everything else must be identical
    assert regenerated[1:] == committed.splitlines()[1:]
    linked = set(re.findall(r"\(figures/([^)]+\.png)\)", "\n".join(regenerated)))
    assert linked and linked <= {p.name for p in (ROOT / "results" / "figures").iterdir()}
