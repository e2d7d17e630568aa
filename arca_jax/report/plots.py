"""Curves over training steps, one line per arm: reward and held-out accuracy, Gini and EffN/T."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from arca_jax.report.figure import _new_figure, _no_data
from arca_jax.report.records import Run, sort_runs


def _mpl_text(s: str) -> str:
    """Escapes '$' so that matplotlib does not read labels as mathtext."""
    return s.replace("$", r"\$")


def _arm_labels(runs: Sequence[Run]) -> list[str]:
    """The run's arm label (``ARCA r16``, see ``arms``), with ``seed N`` appended where the arm
    has several runs, and the run name where that still leaves two runs with one label."""
    from arca_jax.report.arms import arm_of, group_arms

    arm = arm_of(group_arms(runs))
    labels = [arm[r.name].label + (f" seed {r.seed}" if len(arm[r.name].runs) > 1 else "")
              for r in runs]
    return [f"{lab} ({r.name})" if labels.count(lab) > 1 else lab for r, lab in zip(runs, labels)]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (shorter windows at the start)."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _plot_step_series(ax, runs: Sequence[Run], key: str, *, smooth: int = 0) -> None:
    """One line per run of metrics ``key`` over steps (raw faint + trailing mean if smooth)."""
    drawn = False
    for run, label, color in zip(runs, _arm_labels(runs), _colors(len(runs))):
        x, y = _finite(run.metrics.steps, run.metrics.values(key))
        if not x.size:
            continue
        drawn = True
        if smooth > 1 and x.size > 1:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(x, trailing_mean(y, smooth), color=color, label=_mpl_text(label))
        else:
            ax.plot(x, y, color=color, label=_mpl_text(label), marker="." if x.size < 30 else None)
    if not drawn:
        _no_data(ax)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _plot_eval_series(ax, runs: Sequence[Run]) -> None:
    """Held-out greedy accuracy (solid) and pass@k (dashed) per run over steps."""
    drawn = False
    for run, label, color in zip(runs, _arm_labels(runs), _colors(len(runs))):
        steps = np.array([e.step for e in run.evals], dtype=np.int64)
        drawn_run = False  # one legend entry per arm
        for attr, style in (("greedy_accuracy", "-"), ("pass_at_k", "--")):
            vals = np.array([np.nan if getattr(e, attr) is None else getattr(e, attr)
                             for e in run.evals], dtype=np.float64)
            x, y = _finite(steps, vals)
            if x.size:
                ax.plot(x, y, style, color=color, marker="o", markersize=3,
                        label=None if drawn_run else _mpl_text(label))
                drawn = drawn_run = True
    if not drawn:
        _no_data(ax)
    ax.set_xlabel("training step (0 = base model)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def plot_reward_accuracy(runs: Sequence[Run], path: Path) -> Path:
    """PNG: train reward per step (faint) with a 10-step trailing mean, and held-out accuracy."""
    runs = sort_runs(runs)
    fig = _new_figure(12, 4.5)
    ax_r, ax_a = fig.subplots(1, 2)
    _plot_step_series(ax_r, runs, "reward_mean", smooth=10)
    ax_r.set_ylabel("mean train reward (10-step trailing mean)")
    ax_r.set_title("Training reward")
    _plot_eval_series(ax_a, runs)
    ax_a.set_title("Held-out accuracy (solid greedy, dashed pass@k)")
    _legend(ax_r)
    _legend(ax_a)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def plot_weight_diagnostics(runs: Sequence[Run], path: Path) -> Path:
    """PNG: per-step Gini and EffN/T of the token weights, one line per arm."""
    runs = sort_runs(runs)
    fig = _new_figure(12, 4.5)
    ax_g, ax_e = fig.subplots(1, 2)
    _plot_step_series(ax_g, runs, "weight_gini")
    ax_g.set_ylabel("Gini (0 = uniform, ~1 = one token)")
    ax_g.set_title("Gini of the token weights")
    _plot_step_series(ax_e, runs, "effective_token_ratio")
    ax_e.set_ylabel("EffN/T (1 = uniform, 1/T = one token)")
    ax_e.set_title("Effective token ratio")
    for ax in (ax_g, ax_e):
        ax.set_ylim(-0.03, 1.03)
    _legend(ax_g)
    _legend(ax_e)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path
