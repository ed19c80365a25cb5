"""A PNG of the planner's fronts: latency against money, leakage as colour, the chosen plan ringed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from splitc.passes.planner import PlanSet


def plot_fronts(fronts: Sequence[PlanSet], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fronts), figsize=(5 * len(fronts), 4), squeeze=False)
    for ax, front in zip(axes[0], fronts):
        latency = [p.latency_ms for p in front.plans]
        cost = [p.cost_usd_per_million for p in front.plans]
        measured = all(p.leakage is not None for p in front.plans)
        colour = {"c": [p.leakage for p in front.plans], "cmap": "viridis_r", "vmin": 0, "vmax": 1} if measured else {"color": "tab:blue"}
        points = ax.scatter(latency, cost, s=30, edgecolors="k", linewidths=0.3, **colour)
        chosen = front.plans[front.chosen]
        ax.scatter([chosen.latency_ms], [chosen.cost_usd_per_million], s=160, facecolors="none", edgecolors="red", linewidths=1.5,
                   label=f"chosen ({front.objective})")
        ax.set_title(f"{front.link.name}: {front.link.mbit_s:g} Mbit/s, {front.link.rtt_ms:g} ms RTT")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("USD per million requests")
        ax.legend(loc="upper right", fontsize=8)
        if measured:
            fig.colorbar(points, ax=ax, label="leakage (dCor)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
