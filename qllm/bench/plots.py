"""PNG plots of a workload benchmark result, shaped like the paper's figures 2-4 (needs matplotlib)."""

from __future__ import annotations

import os
from typing import Any

from qllm.bench.stats import Record

MISSING = "plots skipped: matplotlib is not installed (pip install 'qllm[bench]')"


def write(result: dict[str, Any], directory: str, *, cdf_rate: float | None = None) -> list[str]:
    """Write the four plots into ``directory``; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    systems = [s["name"] for s in result["systems"]]
    color = {name: f"C{i}" for i, name in enumerate(systems)}  # one colour per system in every plot
    rates = sorted({c["rate"] for c in result["cells"]})
    slo = result["slo"]["ttft_s"]

    def series(cls: str, key: str) -> dict[str, list[float | None]]:
        by = {(c["system"], c["rate"]): c["metrics"][cls][key] for c in result["cells"]}
        return {s: [by.get((s, r)) for r in rates] for s in systems}

    def line_plot(
        name: str, data: dict[str, list], ylabel: str, title: str, *, log: bool = False, hline=None, ylim=None
    ) -> str:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, ys in data.items():
            pts = [(r, y) for r, y in zip(rates, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system, color=color[system])
        if hline is not None:
            ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
        if log:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(directory, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    written = [
        line_plot("ttft_vs_rate.png", series("ls", "ttft_mean_s"), "LS TTFT, mean (s)", "LS time to first token",
                  log=True, hline=(slo, f"SLO {slo:.2g}s")),
        line_plot("slo_vs_rate.png", series("ls", "slo_attainment"), "LS requests within SLO", "LS SLO attainment",
                  hline=(0.9, "90%"), ylim=(-0.03, 1.05)),
        line_plot("be_throughput_vs_rate.png", series("be", "tokens_per_s"), "BE tokens/s", "BE throughput"),
    ]  # fmt: skip

    at = cdf_rate if cdf_rate is not None else rates[-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    at_rate = {c["system"]: c for c in result["cells"] if c["rate"] == at}
    for system in systems:
        cell = at_rate.get(system)
        if cell is None:
            continue
        ttft = sorted(
            t for r in cell["records"] if r[0] == "ls" and (t := Record.from_row(r).ttft) is not None
        )
        if ttft:
            cdf = [(i + 1) / len(ttft) for i in range(len(ttft))]
            ax.step(ttft, cdf, where="post", label=system, color=color[system])
    ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:.2g}s")
    ax.set_xscale("log")
    ax.set_xlabel("LS TTFT (s)")
    ax.set_ylabel("fraction of LS requests")
    ax.set_title(f"LS TTFT CDF at {at:g} req/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(directory, "ttft_cdf.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [*written, path]
