"""The credit heatmap: one completion's tokens shaded by each method's weights (PNG and HTML).

Shading is per method row: weight / the row's largest weight, so each row shows where *that*
method puts its credit; the row label gives the completion's Gini and EffN/T for scale.
"""

from __future__ import annotations

import dataclasses
import html
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from arca_jax.report.figure import _new_figure, _no_data
from arca_jax.report.load import _ranges
from arca_jax.report.records import METHOD_LABELS, MODES, SAMPLES_FILE, Run, Sample, sort_runs
from arca_jax.report.tables import _fmt


@dataclasses.dataclass(frozen=True)
class HeatmapChoice:
    """The completion a heatmap shows: ``run.samples[index]``."""

    run: Run
    index: int

    @property
    def sample(self) -> Sample:
        return self.run.samples[self.index]


@dataclasses.dataclass(frozen=True)
class HeatmapRow:
    """One method's weights on the chosen completion.

    intensity: weight / the row's largest weight (0 where the weight is not finite).
    """

    mode: str
    weights: np.ndarray
    intensity: np.ndarray
    gini: float
    effective_token_ratio: float


def gini(w: np.ndarray) -> float:
    """Gini coefficient of non-negative weights (0 uniform, (n-1)/n one token); NaN if undefined."""
    w = np.sort(np.asarray(w, dtype=np.float64))
    n, total = w.size, w.sum()
    if n < 2 or not total > 0:
        return math.nan
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * w) / (n * total))


def effective_token_ratio(w: np.ndarray) -> float:
    """EffN/T = (sum w)^2 / (T sum w^2): 1 uniform, 1/T one token; NaN if undefined."""
    w = np.asarray(w, dtype=np.float64)
    total = w.sum()
    if w.size == 0 or not total > 0:
        return math.nan
    return float(total * total / (w.size * np.sum(w * w)))


def _best_index(samples: Sequence[Sample], candidates: Sequence[int]) -> int:
    """The latest candidate with the highest reward (unknown rewards rank lowest)."""
    def key(i: int) -> tuple[float, int, int]:
        r = samples[i].reward
        return (-math.inf if r is None or math.isnan(r) else r, samples[i].step, i)
    return max(candidates, key=key)


def _find_run(runs: Sequence[Run], name: str) -> Run:
    for run in runs:
        if name in (run.name, str(run.path)):
            return run
    raise ValueError(f"heatmap run {name!r} is not among the runs: {[r.name for r in runs]}")


def choose_sample(runs: Sequence[Run], run: str | None = None, step: int | None = None,
                  index: int | None = None) -> HeatmapChoice | None:
    """Picks the completion for the heatmap.

    Default: in the ARCA run of highest rank that logged samples (else the first run in table
    order that did), the latest sample with the highest reward (reward 1 for 0/1 rewards).
    ``run`` (a run name or the directory as given) fixes the run, ``step`` restricts to the samples
    of that step and ``index`` picks one of them (Python indexing, over the run's samples, or the
    step's when ``step`` is given). Returns None when no run logged samples and nothing was asked.
    """
    if run is not None:
        chosen = _find_run(runs, run)
        if not chosen.samples:
            raise ValueError(f"heatmap run {chosen.name!r} logged no samples ({SAMPLES_FILE})")
        candidates_runs = [chosen]
    else:
        ordered = sort_runs(runs)
        arca = sorted((r for r in ordered if r.method == "arca"), key=lambda r: -r.rank)
        candidates_runs = [r for r in arca + ordered if r.samples]
        if not candidates_runs:
            if step is not None or index is not None:
                raise ValueError("no run logged samples to draw a heatmap from")
            return None
    target = candidates_runs[0]
    pool = list(range(len(target.samples)))
    if step is not None:
        pool = [i for i in pool if target.samples[i].step == step]
        if not pool:
            logged = sorted({s.step for s in target.samples})
            raise ValueError(f"run {target.name!r} logged no sample at step {step}; logged "
                             f"steps: {_ranges(logged)}")
    if index is None:
        return HeatmapChoice(target, _best_index(target.samples, pool))
    if not -len(pool) <= index < len(pool):
        raise ValueError(f"heatmap index {index} is out of range: run {target.name!r} has "
                         f"{len(pool)} matching samples")
    return HeatmapChoice(target, pool[index])


def heatmap_rows(sample: Sample) -> list[HeatmapRow]:
    """The sample's weights per method, in the paper's order (unknown modes after)."""
    modes = [m for m in MODES if m in sample.weights]
    modes += sorted(m for m in sample.weights if m not in MODES)
    rows = []
    for mode in modes:
        w = np.asarray(sample.weights[mode], dtype=np.float64)
        finite = np.where(np.isfinite(w), w, 0.0)
        top = finite.max() if finite.size else 0.0
        intensity = np.clip(finite / top, 0.0, 1.0) if top > 0 else np.zeros_like(finite)
        rows.append(HeatmapRow(mode, w, intensity, gini(w), effective_token_ratio(w)))
    return rows


#: Colour of full credit; cells blend from white to it with the row-relative weight.
_CREDIT_RGB = (0.84, 0.30, 0.05)


def _cell_rgb(intensity: float) -> tuple[float, float, float]:
    return tuple(1.0 - intensity * (1.0 - c) for c in _CREDIT_RGB)


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def display_token(tok: str) -> str:
    """A token as printed in the heatmap: newline as '↵', tab as '→', empty as '∅'."""
    shown = tok.replace("\r", "").replace("\n", "↵").replace("\t", "→")
    return shown if shown else "∅"


def row_label(mode: str, run: Run | None = None) -> str:
    """A heatmap row's name: the paper's name of the method; the "arca" row of a run that
    measures ARCA differently (grpo.arca_layers, arca_relative) says how, e.g.
    ``ARCA [layers=all]``."""
    label = METHOD_LABELS.get(mode, mode)
    variant = run.arca_variant if run is not None and mode == "arca" else ""
    return f"{label} [{variant}]" if variant else label


def _row_caption(row: HeatmapRow, run: Run | None = None) -> str:
    return (f"{row_label(row.mode, run)}: Gini {_fmt(row.gini, 2)}, "
            f"EffN/T {_fmt(row.effective_token_ratio, 2)}")


def _choice_caption(choice: HeatmapChoice) -> str:
    s = choice.sample
    reward = "n/a" if s.reward is None else f"{s.reward:g}"
    return (f"run {choice.run.name} ({choice.run.label}), step {s.step}, reward {reward}, "
            f"{len(s.tokens)} tokens")


def _wrap_lines(tokens: Sequence[str], line_chars: int) -> list[list[int]]:
    """Token indices per printed line: break before a token that would overflow, after newlines."""
    lines: list[list[int]] = [[]]
    used = 0
    for i, tok in enumerate(tokens):
        width = len(display_token(tok))
        if lines[-1] and used + width > line_chars:
            lines.append([])
            used = 0
        lines[-1].append(i)
        used += width
        if "\n" in tok:
            lines.append([])
            used = 0
    return [ln for ln in lines if ln]


def plot_heatmap(choice: HeatmapChoice, path: Path, *, max_tokens: int = 256,
                 line_chars: int = 100) -> Path:
    """PNG: the completion's tokens as cells, one row per method under each printed line.

    Shade = weight / the row's largest weight; the first ``max_tokens`` tokens are drawn.
    """
    rows = heatmap_rows(choice.sample)
    tokens = choice.sample.tokens[:max_tokens]
    lines = _wrap_lines(tokens, line_chars)
    n_modes = max(len(rows), 1)
    band = n_modes + 0.7  # rows per printed line, with a gap
    font, char_w, row_h = 8.0, 8.0 * 0.61 / 72, 0.19  # pt, inch per char, inch per row
    header = 0.35 + 0.16 * (len(rows) + 2)
    width_chars = max([sum(len(display_token(tokens[i])) for i in ln) for ln in lines] + [80])
    label_w = 1.3
    fig_w = label_w + width_chars * char_w + 0.3
    fig_h = header + max(len(lines), 1) * band * row_h + 0.2
    fig = _new_figure(fig_w, fig_h)
    from matplotlib.patches import Rectangle

    ax = fig.add_axes((label_w / fig_w, 0.2 / fig_h, width_chars * char_w / fig_w,
                       (fig_h - header - 0.2) / fig_h))
    ax.set_xlim(0, width_chars)
    ax.set_ylim(max(len(lines), 1) * band, 0)
    ax.axis("off")

    title = [_choice_caption(choice)]
    if len(choice.sample.tokens) > max_tokens:
        title.append(f"first {max_tokens} of {len(choice.sample.tokens)} tokens shown")
    title.append("shade = token weight / largest weight of that method on this completion")
    title += [_row_caption(r, choice.run) for r in rows]
    fig.text(0.01, 1 - 0.1 / fig_h, "\n".join(title), va="top", ha="left", fontsize=7.5,
             parse_math=False)
    if not rows:
        _no_data(ax)

    for li, line in enumerate(lines):
        for ri, row in enumerate(rows):
            y = li * band + ri
            ax.text(-1.0, y + 0.45, row_label(row.mode, choice.run), ha="right",
                    va="center", fontsize=7, parse_math=False, clip_on=False)
            x = 0
            for i in line:
                shown = display_token(tokens[i])
                ax.add_patch(Rectangle((x, y + 0.05), len(shown), 0.9, linewidth=0.3,
                                       edgecolor="#dddddd",
                                       facecolor=_cell_rgb(float(row.intensity[i]))))
                ax.text(x + len(shown) / 2, y + 0.5, shown, ha="center", va="center",
                        fontsize=font, family="DejaVu Sans Mono", parse_math=False)
                x += len(shown)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font (e.g. CJK tokens)
        fig.savefig(path, dpi=120, format="png")
    return path


_HTML_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th { text-align: right; vertical-align: top; padding: 0.4em 0.8em; font-weight: normal;
     white-space: nowrap; }
td.tokens { font-family: "DejaVu Sans Mono", monospace; font-size: 13px; line-height: 1.7;
            white-space: pre-wrap; padding: 0.4em 0; border-bottom: 1px solid #ddd; }
td.tokens span { border-right: 1px solid #fff; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.6em; }
.scale span { display: inline-block; width: 2.2em; text-align: center; font-size: 11px; }
"""


def _html_tokens(tokens: Sequence[str], row: HeatmapRow) -> str:
    n = len(tokens)
    spans = []
    for i, tok in enumerate(tokens):
        w = row.weights[i]
        title = f"token {i}: w = {w:.4g}, T·w = {n * w:.3g} (1 = uniform share)"
        spans.append(f'<span style="background:{_hex(_cell_rgb(float(row.intensity[i])))}" '
                     f'title="{html.escape(title)}">{html.escape(display_token(tok))}</span>'
                     + ("<br>" if "\n" in tok else ""))
    return "".join(spans)


def render_heatmap_html(choice: HeatmapChoice) -> str:
    """A self-contained HTML page: one row per method, tokens as shaded spans (text escaped)."""
    s = choice.sample
    rows = heatmap_rows(s)
    scale = "".join(f'<span style="background:{_hex(_cell_rgb(v))}">{v:g}</span>'
                    for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    body = [
        "<h1>Credit heatmap</h1>",
        f"<p>{html.escape(_choice_caption(choice))}. Each row shades the completion's tokens by "
        "one method's weight divided by that method's largest weight on this completion; hover "
        "a token for its weight w and T·w (1 = the uniform share).</p>",
        f'<p class="scale">shade: {scale}</p>',
        f"<details><summary>prompt</summary><pre>{html.escape(s.prompt)}</pre></details>",
        "<table>",
    ]
    for row in rows:
        caption = html.escape(_row_caption(row, choice.run)).replace(": ", ":<br>", 1)
        body.append(f'<tr><th>{caption}</th><td class="tokens">{_html_tokens(s.tokens, row)}'
                    "</td></tr>")
    body.append("</table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Credit heatmap: {html.escape(choice.run.name)}</title>"
            f"<style>{_HTML_STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def write_heatmap_html(choice: HeatmapChoice, path: Path) -> Path:
    path.write_text(render_heatmap_html(choice), encoding="utf-8")
    return path
