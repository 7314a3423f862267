"""PNG plots of a comparison: latency CDF per policy, and GPUs alive over time with the GPUs
each policy's chosen configuration uses (labelled with the configuration at each change).

matplotlib is imported here only (Agg backend, no display), so the simulator itself never needs it.
"""

from __future__ import annotations

from pathlib import Path

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
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Latency CDF {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    p = out / "latency_cdf.png"
    fig.tight_layout()
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

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
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GPUs")
    ax.set_title(f"Fleet and chosen configuration {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    p = out / "gpus_over_time.png"
    fig.tight_layout()
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
    return paths
