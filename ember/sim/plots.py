"""PNG plots of a comparison: latency CDF per policy, and GPUs alive over time with the GPUs
each policy's chosen configuration uses (labelled with the configuration at each change).

matplotlib is imported here only (Agg backend, no display), so the simulator itself never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.sim.metrics import SimResult


def write_plots(results: dict[str, SimResult], out_dir: str | Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for name, r in results.items():
        lat = r.latencies_s
        if lat:
            ys = [(i + 1) / r.requests for i in range(len(lat))]
            ax.step(lat, ys, where="post", label=f"{name} (P99 {r.p99_s:.1f} s)")
    labels = ("end-to-end latency (s)", "fraction of requests", f"Latency CDF {title}")
    paths.append(_save(fig, ax, out / "latency_cdf.png", labels, legend_size=8))

    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=90)
    first = next(iter(results.values()), None)
    if first is not None and first.timeline:
        ts = [t for t, *_ in first.timeline]
        alive = [a for _, a, _, _ in first.timeline]
        ax.step(ts, alive, where="post", color="black", lw=2, label="GPUs alive")
    for name, r in results.items():
        if not r.timeline:
            continue
        ts = [t for t, *_ in r.timeline]
        used = [u for _, _, u, _ in r.timeline]
        (line,) = ax.step(ts, used, where="post", label=f"{name}: GPUs in use")
        if name in ("ember", "spotserve") or len(results) == 1:
            for t, _, u, label in r.timeline:
                ax.annotate(label, (t, u), fontsize=6, color=line.get_color(), rotation=20)
    labels = ("time (s)", "GPUs", f"Fleet and chosen configuration {title}")
    paths.append(_save(fig, ax, out / "gpus_over_time.png", labels, legend_size=7))
    return paths


def _save(fig: Any, ax: Any, path: Path, labels: tuple[str, str, str], legend_size: int) -> Path:
    """Axis labels, title, grid and legend; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2].strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
