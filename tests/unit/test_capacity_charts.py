"""The capacity charts an operator reads without the text: the documented command redraws
them from docs/img/capacity.json, and each chart has one question as its title, axes with
units, a legend naming every line, and linear axes unless a log one is labelled."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO

sys.path.insert(0, str(REPO / "loadtests"))
capacity_charts = importlib.import_module("capacity_charts")

DATA = REPO / "docs" / "img" / "capacity.json"


def test_plot_only_draws_every_chart_the_docs_show(tmp_path: Path) -> None:
    shutil.copy(DATA, tmp_path / "capacity.json")
    result = subprocess.run(
        [sys.executable, str(REPO / "loadtests" / "capacity.py"), "--plot-only",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    for name in capacity_charts.CHARTS:
        assert f"chart: {tmp_path / name}" in result.stdout
        assert (tmp_path / name).stat().st_size > 10_000
        assert f"(img/{name})" in docs, f"docs/benchmarks.md does not show {name}"
        assert (REPO / "docs" / "img" / name).exists(), f"docs/img/{name} is not committed"


def test_each_chart_asks_one_question_and_names_its_lines() -> None:
    import matplotlib.pyplot as plt

    study = json.loads(DATA.read_text())
    drawn = capacity_charts.figures(study)
    assert [name for name, _ in drawn] == list(capacity_charts.CHARTS)
    for name, fig in drawn:
        assert len(fig.axes) == 1, f"{name}: one chart, not panels"
        ax = fig.axes[0]
        title = fig._suptitle.get_text()
        assert title.endswith("?"), f"{name}: the title is the question: {title!r}"
        assert not re.search(r"\d+x\d+|limit \d", title), f"{name}: jargon in {title!r}"
        xlabel, ylabel = ax.get_xlabel(), ax.get_ylabel()
        assert xlabel and ylabel
        assert any(unit in ylabel for unit in ("per second", "%", "seconds", "ms")), ylabel
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        legend = ax.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()] == [line.get_label() for line in lines]
        data_lines = [line for line in lines if len(line.get_xdata()) > 2]
        for line in data_lines:
            # "gthread, 4 workers x 2 threads, admits 2 calls per worker (8 in all)"
            assert " workers" in line.get_label() and "calls per worker" in line.get_label()
        assert ax.get_xscale() == "linear", name
        if ax.get_yscale() != "linear":
            assert "log scale" in ylabel, f"{name}: a log axis must say so"
        plt.close(fig)
