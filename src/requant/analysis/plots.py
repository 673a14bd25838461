"""PNG plots of the sensitivity reports (matplotlib, the optional `plot` extra, imported only here)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .reports import Report

RULE_STYLE = {"midpoint": "o-", "trapezoid": "s-", "left": "v-", "right": "^-", "gauss": "D-"}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a ConfigError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with: pip install 'requant[plot]'") from None
    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_nodes(report: Report, path: Path) -> Path:
    """|relative error| of predicted ΔF against gradient evaluations per window, one line per rule; and
    the integrand dF/dt along the path with F(t) − F(0)."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule in dict.fromkeys(r["rule"] for r in report.rows):
        rows = sorted((r for r in report.rows if r["rule"] == rule), key=lambda r: r["grad_evals"])
        xs = [r["grad_evals"] for r in rows]
        ys = [max(abs(r["rel_error"]), 1e-12) * 100 for r in rows]
        ax.plot(xs, ys, RULE_STYLE.get(rule, "x-"), label=rule)
    target = report.summary.get("target_rel_error")
    if target:
        ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"{100 * target:g}% target")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("gradient evaluations per window")
    ax.set_ylabel("|predicted − actual| / |actual ΔF|  (%)")
    ax.set_title(f"PQI quadrature error (actual ΔF = {report.summary.get('actual', float('nan')):.4g} nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    pts = report.summary.get("path", [])
    if pts:
        ts = [p["t"] for p in pts]
        ax2.plot(ts, [p["dF_dt"] for p in pts], ".-", label="dF/dt = ∇F(w+tΔw)ᵀΔw")
        ax2.plot(ts, [p["loss"] - pts[0]["loss"] for p in pts], ".-", label="F(t) − F(first node)")
        ax2.axhline(0, color="grey", lw=0.8)
        ax2.set_xlabel("t (fraction of the way from w to w̃)")
        ax2.set_ylabel("nats")
        ax2.set_title("along the path")
        ax2.grid(True, alpha=0.3)
        ax2.legend()
    return _save(fig, path)


def _hollow_note(ax: Any) -> None:
    ax.text(0.99, 0.01, "hollow markers: value < 0", transform=ax.transAxes, ha="right", va="bottom", fontsize=8)


def _signed_on_log(ax: Any, xs: list[float], ys: list[float], style: str, label: str) -> None:
    # Log axes need |y|; negative values are drawn hollow so the sign is still visible.
    ax.plot(xs, [max(abs(y), 1e-30) for y in ys], style, label=label, mfc="none")
    pos = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
    if pos:
        ax.plot(*zip(*pos, strict=True), style[0], color=ax.lines[-1].get_color())


def plot_lambda(report: Report, path: Path) -> Path:
    """Actual ΔF against λ with the first-, second-order and total Taylor predictions, log-log."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = sorted(report.rows, key=lambda r: r["lambda"])
    lam = [r["lambda"] for r in rows]
    _signed_on_log(ax, lam, [r["actual"] for r in rows], "o-", "actual ΔF")
    _signed_on_log(ax, lam, [r["taylor"] for r in rows], "s--", "Taylor gᵀΔw + ½ΔwᵀHΔw")
    _signed_on_log(ax, lam, [r["first_order"] for r in rows], "^:", "first order gᵀΔw")
    _signed_on_log(ax, lam, [r["second_order"] for r in rows], "v:", "second order ½ΔwᵀHΔw")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("λ  (weights w + λΔw)")
    ax.set_ylabel("|ΔF|  (nats)")
    ax.set_title("Loss change along the path vs the Taylor expansion at w")
    _hollow_note(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sublayers(report: Report, path: Path) -> Path:
    """Heat map of mean |ΔF_PQI| per weight, blocks × sub-layer kinds, log colour scale."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    kinds = [c for c in report.columns if c != "block"]
    blocks = [str(r["block"]) for r in report.rows]
    data = [[r.get(k, math.nan) for k in kinds] for r in report.rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2.5, 0.28 * len(blocks) + 1.8))
    positive = [v for row in data for v in row if v == v and v > 0]
    norm = LogNorm(min(positive), max(positive)) if positive else None
    im = ax.imshow(data, aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("sub-layer")
    ax.set_ylabel("decoder block")
    ax.set_title("mean |ΔF_PQI| per weight")
    fig.colorbar(im, ax=ax, label="nats per weight")
    return _save(fig, path)


def plot_coverage(report: Report, path: Path) -> Path:
    """Share of Σ|ΔF_PQI| covered by the top p% of weights (log p), with the reported points marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curve = report.summary.get("curve", [])
    if curve:
        ax.plot([c["percent"] for c in curve], [c["share"] for c in curve], "-", label="top p% of weights")
    ax.plot([r["percent"] for r in report.rows], [r["share"] for r in report.rows], "o", label="reported p")
    grid = [10 ** (k / 20) for k in range(-60, 41)]
    ax.plot(grid, grid, ":", color="grey", label="uniform (share = p)")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("top p% of weights by |ΔF_PQI|")
    ax.set_ylabel("share of Σ|ΔF_PQI|  (%)")
    ax.set_title("Coverage of the element-wise PQI")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_blocks(report: Report, path: Path) -> Path:
    """Per block: |actual ΔF|, |PQI| and the Taylor/Fisher terms on a log scale (hollow: negative)."""
    plt = pyplot()
    rows = [r for r in report.rows if r["block"] != "all"]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * len(rows) + 3), 4.5))
    xs = list(range(len(rows)))
    for key, style, label in (
        ("actual", "o-", "actual ΔF"),
        ("pqi", "s--", f"PQI ({report.summary.get('pqi_scope', 'joint')})"),
        ("first_order", "^:", "gᵀΔw"),
        ("second_order", "v:", "½ΔwᵀHΔw"),
        ("fisher_second_order", "x:", "½ΣF_iiΔw²"),
    ):
        _signed_on_log(ax, xs, [r[key] for r in rows], style, label)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(r["block"]) for r in rows])
    ax.set_xlabel("quantized block (alone)")
    ax.set_ylabel("|ΔF|  (nats)")
    ax.set_title("Per-block quantization impact vs its estimates")
    _hollow_note(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {
    "nodes": plot_nodes,
    "lambda": plot_lambda,
    "sublayers": plot_sublayers,
    "coverage": plot_coverage,
    "blocks": plot_blocks,
}


def write_plots(report: Report, directory: str | os.PathLike) -> list[Path]:
    """Write the report's PNG(s) into `directory` (created if needed) and return their paths."""
    plot = PLOTS.get(report.name)
    if plot is None:
        raise ConfigError(f"no plot for report {report.name!r}; plots exist for {', '.join(PLOTS)}")
    pyplot()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return [plot(report, d / f"sensitivity_{report.name}.png")]
