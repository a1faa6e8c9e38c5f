"""The capacity study's charts, drawn from ``docs/img/capacity.json``: one question each.

    capacity_throughput_gthread.png  how many calls/s does a gthread replica answer?
    capacity_throughput_gevent.png   the same for gevent (ten times the range: its own chart)
    capacity_refusals.png            from what load does a replica refuse calls (503)?
    capacity_latency.png             how long does an answered call take as load grows?
    capacity_refusal_speed.png       how fast is a refusal? (the one log axis, labelled)

Every chart has a plain title with the question, axes with their units, and a
legend that names each line in words (worker class, workers, threads, admission
limit). Load is the number of clients, each sending its next request as soon as
it has an answer; on the shared charts it is shown as a share of the replica's
nominal capacity (workers x admission limit), so configurations of 8 and 800
calls can be compared on one linear axis.

    .venv/bin/python loadtests/capacity.py --plot-only     # redraw from the JSON
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What each chart file answers; capacity.py prints the paths, docs/benchmarks.md shows them.
CHARTS = (
    "capacity_throughput_gthread.png",
    "capacity_throughput_gevent.png",
    "capacity_refusals.png",
    "capacity_latency.png",
    "capacity_refusal_speed.png",
)
SUBTITLE = "one replica (4 gunicorn workers), model answering in 1 s, clients with no pause"
# One colour and marker per configuration, the same on every chart.
STYLES = ("#1f77b4", "o"), ("#ff7f0e", "s"), ("#2ca02c", "^"), ("#d62728", "D"), ("#9467bd", "v")


def describe(res: dict[str, Any]) -> str:
    """A configuration in words, e.g. "gthread, 4 workers x 2 threads, 2 calls each (8 in all)"."""
    cfg = res["config"]
    per_worker = cfg["admitted"] // cfg["workers"]
    shape = (
        f"{cfg['workers']} workers x {cfg['threads']} threads"
        if cfg["worker_class"] == "gthread"
        else f"{cfg['workers']} workers"
    )
    return (
        f"{cfg['worker_class']}, {shape}, admits {per_worker} calls per worker "
        f"({cfg['admitted']} in all)"
    )


def load_share(res: dict[str, Any]) -> list[float]:
    """Each level's clients as a percentage of the configuration's nominal capacity."""
    return [100.0 * p["users"] / res["config"]["admitted"] for p in res["points"]]


def plot(study: dict[str, Any], out: Path) -> list[Path]:
    """Draw every chart of ``CHARTS`` into ``out``; return their paths."""
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    for name, fig in figures(study):
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def figures(study: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every chart as (file name, matplotlib figure), not yet saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = study["results"]
    styles = {res["config"]["name"]: STYLES[i % len(STYLES)] for i, res in enumerate(results)}
    drawn: list[tuple[str, Any]] = []

    def new(title: str) -> tuple[Any, Any]:
        fig, ax = plt.subplots(figsize=(9, 5.2))
        fig.suptitle(title, fontsize=13, fontweight="bold", x=0.01, ha="left")
        ax.set_title(SUBTITLE, fontsize=9, loc="left", color="#444")
        ax.grid(True, alpha=0.3)
        return fig, ax

    def save(fig: Any, ax: Any, name: str, legend_loc: str = "best") -> None:
        ax.legend(fontsize=8, loc=legend_loc, framealpha=0.95)
        fig.tight_layout()
        drawn.append((name, fig))

    for worker_class, name in (("gthread", CHARTS[0]), ("gevent", CHARTS[1])):
        chosen = [r for r in results if r["config"]["worker_class"] == worker_class]
        if not chosen:
            continue
        fig, ax = new(f"{worker_class}: how many calls per second does one replica answer?")
        top = max(p["users"] for r in chosen for p in r["points"])
        ax.plot(
            [0, top],
            [0, top],
            color="#999",
            linestyle=":",
            label="every client answered each second",
        )
        for res in chosen:
            colour, marker = styles[res["config"]["name"]]
            xs = [p["users"] for p in res["points"]]
            ax.plot(
                xs,
                [p["ok_per_s"] for p in res["points"]],
                color=colour,
                marker=marker,
                label=describe(res),
            )
        ax.set_xlim(0, top * 1.03)
        ax.set_ylim(0, top * 1.03)
        ax.set_xlabel("clients (each sends its next request as soon as it has an answer)")
        ax.set_ylabel("answered calls per second (HTTP 200)")
        save(fig, ax, name, "upper left")

    fig, ax = new("From what load does a replica refuse calls (503 overloaded)?")
    for res in results:
        colour, marker = styles[res["config"]["name"]]
        shares = [100.0 * p["overloaded_share"] for p in res["points"]]
        label = describe(res) + ("" if any(shares) else ": never refuses, the excess waits")
        ax.plot(load_share(res), shares, color=colour, marker=marker, label=label)
    ax.axvline(100, color="#999", linestyle=":", label="load = nominal capacity")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 100)
    ax.set_xlabel(
        "load: clients as % of the nominal capacity (workers x calls admitted per worker)"
    )
    ax.set_ylabel("answers that were 503 refusals, %")
    save(fig, ax, CHARTS[2], "upper left")

    fig, ax = new("How long does an answered call take as load grows?")
    ax.axhline(1.0, color="#999", linestyle=":", label="the model's own time: 1 s")
    for res in results:
        colour, marker = styles[res["config"]["name"]]
        p99 = [p["p99_s"] if p["p99_s"] is not None else float("nan") for p in res["points"]]
        ax.plot(load_share(res), p99, color=colour, marker=marker, label=describe(res))
    ax.axvline(100, color="#bbb", linestyle=":", label="load = nominal capacity")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(
        "load: clients as % of the nominal capacity (workers x calls admitted per worker)"
    )
    ax.set_ylabel("time to answer, seconds (99th percentile of the answered calls)")
    save(fig, ax, CHARTS[3], "upper left")

    refusing = [r for r in results if any(p["overloaded_p99_s"] for p in r["points"])]
    if refusing:
        fig, ax = new("How fast is a refusal (503 overloaded)?")
        ax.axhline(50, color="#999", linestyle=":", label="target E3: within 50 ms")
        for res in refusing:
            colour, marker = styles[res["config"]["name"]]
            pts = [
                (x, p)
                for x, p in zip(load_share(res), res["points"], strict=True)
                if p["overloaded_p99_s"]
            ]
            ax.plot(
                [x for x, _ in pts],
                [p["overloaded_p99_s"] * 1000 for _, p in pts],
                color=colour,
                marker=marker,
                label=describe(res),
            )
        # From 3 ms to over a second: only a log axis shows both ends.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(left=0)
        ax.set_xlabel(
            "load: clients as % of the nominal capacity (workers x calls admitted per worker)"
        )
        ax.set_ylabel("time to refuse, ms (99th percentile; log scale)")
        save(fig, ax, CHARTS[4], "upper left")
    return drawn
