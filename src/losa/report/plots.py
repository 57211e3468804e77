"""Report figures (matplotlib, non-interactive Agg backend), readable in print and in grey scale.

Each ``plot_*`` function takes a :class:`RunReport` and an output path, writes one PNG and returns
its path, or returns None without writing anything when the run has no data for that figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from losa.report.schema import RunReport  # noqa: E402

# Okabe-Ito colours (colour-blind safe); markers and line styles keep series apart in grey scale
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "savefig.dpi": 150, "savefig.bbox": "tight", "figure.facecolor": "white"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _new(width: float = 7.0, height: float = 3.6) -> tuple[plt.Figure, plt.Axes]:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax


def _layer_ticks(ax: plt.Axes, n: int) -> None:
    step = max(1, int(np.ceil(n / 16)))
    ax.set_xticks(range(0, n, step))
    ax.set_xlabel("decoder layer")


def _series_style(i: int) -> tuple[str, str]:
    """Colour and marker of the i-th series (one per LoSA step)."""
    return COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]


def _finish_per_layer(ax: plt.Axes, n: int, ylabel: str, title: str, ncols: int) -> None:
    _layer_ticks(ax, n)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(ncols=ncols, loc="best")


def plot_layer_sparsity(report: RunReport, path: Path) -> Path | None:
    """Per-layer sparsity: target (hatched) vs achieved (solid) bars, with the overall target line."""
    target, achieved = report.layer_sparsity()
    n = max(len(target), len(achieved))
    if n == 0:
        return None
    with plt.rc_context(STYLE):
        fig, ax = _new()
        x = np.arange(n)
        w = 0.4 if target and achieved else 0.8
        if target:
            ax.bar(x - w / 2 if achieved else x, 100 * np.asarray(target), w, label="target",
                   color="white", edgecolor=COLORS[0], hatch="///", linewidth=0.8)
        if achieved:
            ax.bar(x + w / 2 if target else x, 100 * np.asarray(achieved), w, label="achieved", color=COLORS[1])
        ax.axhline(100 * report.meta.sparsity, color="black", linestyle="--", linewidth=1,
                   label=f"overall target {100 * report.meta.sparsity:.0f}%")
        _layer_ticks(ax, n)
        ax.set_ylabel("sparsity (%)")
        ax.set_ylim(0, 100 * max([*target, *achieved, report.meta.sparsity]) * 1.35 + 1)
        ax.set_title("Per-layer sparsity: target vs achieved")
        ax.legend(loc="upper center", ncols=3)
        return _save(fig, path)


def plot_ranks(report: RunReport, path: Path) -> Path | None:
    """LoRA rank per layer, one line per LoSA step."""
    steps = [s for s in report.steps if s.ranks]
    if not steps:
        return None
    with plt.rc_context(STYLE):
        fig, ax = _new()
        for i, s in enumerate(steps):
            c, mk = _series_style(i)
            ax.plot(range(len(s.ranks)), s.ranks, marker=mk, markersize=4, color=c,
                    label=f"step {s.step} (S={100 * s.target_sparsity:.0f}%)")
        ax.set_ylim(bottom=0)
        _finish_per_layer(ax, max(len(s.ranks) for s in steps), "LoRA rank", "Allocated LoRA rank per layer",
                          min(4, len(steps)))
        return _save(fig, path)


def plot_cka(report: RunReport, path: Path) -> Path | None:
    """Heat map of the layer-by-layer linear-CKA (RMI) matrix of the latest step that has one."""
    mats = [s for s in report.steps if s.cka]
    if not mats:
        return None
    step = mats[-1]
    m = np.asarray(step.cka, dtype=float)
    with plt.rc_context(STYLE):
        fig, ax = _new(5.6, 4.8)
        im = ax.imshow(m, cmap="viridis", vmin=min(0.0, float(m.min())), vmax=1.0, origin="upper")
        fig.colorbar(im, ax=ax, label="linear CKA")
        ax.grid(False)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("decoder layer")
        step_ticks = max(1, int(np.ceil(len(m) / 12)))
        ax.set_xticks(range(0, len(m), step_ticks))
        ax.set_yticks(range(0, len(m), step_ticks))
        ax.set_title(f"Layer similarity (CKA), step {step.step}")
        return _save(fig, path)


def plot_recon_error(report: RunReport, path: Path) -> Path | None:
    """Reconstruction error per layer before (dashed, open) and after (solid) fine-tuning, per step."""
    steps = [s for s in report.steps if s.recon_error_before or s.recon_error_after]
    if not steps:
        return None
    with plt.rc_context(STYLE):
        fig, ax = _new()
        for i, s in enumerate(steps):
            c, mk = _series_style(i)
            if s.recon_error_before:
                ax.plot(range(len(s.recon_error_before)), s.recon_error_before, linestyle="--", marker=mk,
                        markersize=4, markerfacecolor="white", color=c, label=f"step {s.step} before FT")
            if s.recon_error_after:
                ax.plot(range(len(s.recon_error_after)), s.recon_error_after, linestyle="-", marker=mk,
                        markersize=4, color=c, label=f"step {s.step} after FT")
        values = [v for s in steps for v in (s.recon_error_before or []) + (s.recon_error_after or [])]
        if values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        _finish_per_layer(ax, max(len(s.recon_error_before or s.recon_error_after or []) for s in steps),
                          "reconstruction error", "Layer reconstruction error before / after fine-tuning", 2)
        return _save(fig, path)


def plot_train_loss(report: RunReport, path: Path) -> Path | None:
    """Training loss over optimiser steps, all LoSA steps end to end, step boundaries marked."""
    steps = [s for s in report.steps if s.train_loss]
    if not steps:
        return None
    with plt.rc_context(STYLE):
        fig, ax = _new()
        start = 0
        for i, s in enumerate(steps):
            x = np.arange(start, start + len(s.train_loss))
            ax.plot(x, s.train_loss, color=COLORS[i % len(COLORS)], linewidth=1.2, label=f"step {s.step}")
            if start:
                ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
            start += len(s.train_loss)
        ax.set_xlabel("optimiser step (cumulative)")
        ax.set_ylabel("training loss")
        ax.set_title("Fine-tuning loss")
        ax.legend(ncols=min(4, len(steps)), loc="best")
        return _save(fig, path)


def plot_ppl_per_step(report: RunReport, path: Path) -> Path | None:
    """Perplexity after each step (one line per dataset), x labelled with the step's target sparsity."""
    steps = [s for s in report.steps if s.ppl]
    if not steps:
        return None
    datasets = sorted({d for s in steps for d in s.ppl})
    with plt.rc_context(STYLE):
        fig, ax = _new()
        for i, d in enumerate(datasets):
            pts = [(s.step, s.ppl[d]) for s in steps if d in s.ppl]
            ax.plot(*zip(*pts), marker=MARKERS[i % len(MARKERS)], color=COLORS[i % len(COLORS)], label=d)
            for x, y in pts:
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xticks([s.step for s in steps])
        ax.set_xticklabels([f"{s.step}\nS={100 * s.target_sparsity:.0f}%" for s in steps])
        ax.set_xlabel("LoSA step (target sparsity)")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity after each step")
        ax.legend(loc="best")
        return _save(fig, path)


#: file stem -> (section title, plot function), in report order
PLOTS: dict[str, tuple[str, Callable[[RunReport, Path], Path | None]]] = {
    "layer_sparsity": ("Per-layer sparsity", plot_layer_sparsity),
    "lora_ranks": ("LoRA rank per layer", plot_ranks),
    "cka": ("Layer similarity (CKA / RMI)", plot_cka),
    "recon_error": ("Reconstruction error", plot_recon_error),
    "train_loss": ("Training loss", plot_train_loss),
    "ppl_per_step": ("Perplexity per step", plot_ppl_per_step),
}
