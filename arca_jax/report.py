"""Reports on training runs (finished or not): the paper's two tables, curves, a credit heatmap.

``arca-jax report RUN_DIR... --out DIR`` reads run directories written by the trainer and writes::

    DIR/report.md             the tables inline, links to everything below, notes on the inputs
    DIR/performance.md/.csv   method, rank, trainable params, greedy accuracy, pass@k, train reward
    DIR/diagnostics.md/.csv   method, rank, Gini, EffN/T (averaged over training steps)
    DIR/comparison.md         our numbers beside the paper's published ones, with both settings
    DIR/reward_accuracy.png   train reward and held-out accuracy over steps, one line per arm
    DIR/weight_diagnostics.png  Gini and EffN/T over steps, one line per arm
    DIR/heatmap.png/.html     one completion's tokens shaded by each method's weights

Run-directory contract (the trainer writes exactly this)::

    config.yaml    resolved config; read: grpo.weighting, lora.rank, lora.alpha, task.name,
                   train.seed, train.steps, model.path
    metrics.jsonl  one object per training step: step, reward_mean, reward_std, loss, grad_norm,
                   learning_rate, weight_gini, effective_token_ratio, residual_norm_mean,
                   residual_norm_max (arca only, else absent or null), kl, completion_length,
                   time_sample_s, time_score_s, time_update_s, tokens_per_s
    eval.jsonl     one object per evaluation: step (0 = base model), greedy_accuracy, pass_at_k, k,
                   num_problems
    samples.jsonl  step, prompt, completion, reward, tokens (token strings of the completion),
                   weights {mode: [float per token]} for all five modes on that same completion
    summary.json   written at the end: method, rank, trainable_params, base_greedy_accuracy,
                   base_pass_at_k, final_greedy_accuracy, final_pass_at_k, k, mean_train_reward,
                   mean_weight_gini, mean_effective_token_ratio, steps, wall_time_s, finished

Decisions (each also stated where it applies):

- Errors: a missing or unparsable ``config.yaml`` or ``metrics.jsonl``, a config without a known
  ``grpo.weighting`` or a positive ``lora.rank``, a corrupt line that is not the last line of any
  ``.jsonl`` file, and a record with a wrongly typed field raise ``ValueError`` naming the file
  (and line). ``eval.jsonl``, ``samples.jsonl`` and ``summary.json`` may be missing.
- Tolerated (recorded in ``Run.notes`` and in report.md): an unparsable *last* line of a
  ``.jsonl`` file (a run killed mid-write), an unparsable ``summary.json`` (treated as missing),
  and repeated steps (a resumed run re-logging steps: the later record wins).
- A run is finished when ``summary.json`` exists and says ``finished: true``. For finished runs the
  tables use the summary's values where it has them, else the logs; report.md notes where the
  summary disagrees with the logs. For unfinished runs everything is computed from the logs: the
  accuracy is that of the latest evaluation after step 0, the averages cover the steps logged so
  far, trainable params are unknown (only the summary has them), and the tables say "unfinished".
- Averages "over training" are plain means over the logged steps of the per-step values (steps
  where a value is null or NaN are skipped).
- Table order is the paper's: uniform, surprisal, entropy reduction, divergence, ARCA; by rank
  within a method, then by run name.
- Heatmap shading is per method row: weight / the row's largest weight, so each row shows where
  *that* method puts its credit; the row label gives the completion's Gini and EffN/T for scale.
- Plots use matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), never pyplot, so
  importing or running the report changes no global matplotlib state (notebooks keep their
  backend). matplotlib is imported only when a plot is drawn.
- This module does not import JAX; it only reads files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

#: The five weightings, in the paper's table order (same as ``arca_jax.credit.MODES``; not imported
#: from there so that reading reports does not import JAX).
MODES: tuple[str, ...] = ("uniform", "surprisal", "entropy_reduction", "divergence", "arca")

#: Names the paper's tables use for the modes.
METHOD_LABELS: Mapping[str, str] = {
    "uniform": "uniform",
    "surprisal": "surprisal",
    "entropy_reduction": "entropy reduction",
    "divergence": "policy divergence",
    "arca": "ARCA",
}

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"

_METRIC_NUMBER_KEYS = (
    "reward_mean", "reward_std", "loss", "grad_norm", "learning_rate", "weight_gini",
    "effective_token_ratio", "residual_norm_mean", "residual_norm_max", "kl", "completion_length",
    "time_sample_s", "time_score_s", "time_update_s", "tokens_per_s",
)


# ---------------------------------------------------------------------------------------------
# The paper's published numbers (arXiv 2606.00257; see /work/shared/PAPER_NOTES.md)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaperSetting:
    """What the paper's sweep ran on."""

    model: str = "Qwen/Qwen3-1.7B-Base"
    task: str = "MATH"
    steps: int = 100
    seed: int = 1337
    k: int = 4
    eval_problems: int = 200


@dataclasses.dataclass(frozen=True)
class PaperPerformance:
    """One row of the paper's held-out performance table (trainable params as published)."""

    method: str
    rank: int
    trainable_params: str
    greedy_accuracy: float
    pass_at_k: float
    mean_train_reward: float


@dataclasses.dataclass(frozen=True)
class PaperDiagnostics:
    """One row of the paper's token-weight diagnostics table."""

    method: str
    rank: int
    gini: float
    effective_token_ratio: float


PAPER_SETTING = PaperSetting()

PAPER_PERFORMANCE: tuple[PaperPerformance, ...] = (
    PaperPerformance("uniform", 64, "69.7M", 0.620, 0.675, 0.362),
    PaperPerformance("surprisal", 64, "69.7M", 0.520, 0.650, 0.326),
    PaperPerformance("entropy_reduction", 64, "69.7M", 0.600, 0.700, 0.367),
    PaperPerformance("divergence", 64, "69.7M", 0.565, 0.670, 0.351),
    PaperPerformance("arca", 4, "4.36M", 0.525, 0.640, 0.327),
    PaperPerformance("arca", 16, "17.4M", 0.510, 0.655, 0.336),
    PaperPerformance("arca", 64, "69.7M", 0.590, 0.680, 0.353),
)

PAPER_DIAGNOSTICS: tuple[PaperDiagnostics, ...] = (
    PaperDiagnostics("uniform", 64, 0.000, 1.000),
    PaperDiagnostics("surprisal", 64, 0.941, 0.052),
    PaperDiagnostics("entropy_reduction", 64, 0.920, 0.073),
    PaperDiagnostics("divergence", 64, 0.939, 0.055),
    PaperDiagnostics("arca", 4, 0.353, 0.467),
    PaperDiagnostics("arca", 16, 0.388, 0.460),
    PaperDiagnostics("arca", 64, 0.490, 0.334),
)


# ---------------------------------------------------------------------------------------------
# Run-directory records
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Per-step training metrics, one record per step, sorted by step (later duplicates won)."""

    records: tuple[Mapping[str, Any], ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def steps(self) -> np.ndarray:
        """[N] int64 step numbers."""
        return np.array([r["step"] for r in self.records], dtype=np.int64)

    def values(self, key: str) -> np.ndarray:
        """[N] float64 values of ``key``; NaN where a step lacks it or logged null."""
        out = [r.get(key) for r in self.records]
        return np.array([np.nan if v is None else float(v) for v in out], dtype=np.float64)

    def mean(self, key: str) -> float | None:
        """Mean of ``key`` over the steps that logged a finite value; None if none did."""
        v = self.values(key)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else None


@dataclasses.dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation (step 0 is the base model before training)."""

    step: int
    greedy_accuracy: float | None
    pass_at_k: float | None
    k: int | None
    num_problems: int | None


@dataclasses.dataclass(frozen=True)
class Sample:
    """One logged completion with the five methods' weights on its tokens."""

    step: int
    prompt: str
    completion: str
    reward: float | None
    tokens: tuple[str, ...]
    weights: Mapping[str, tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class Summary:
    """``summary.json`` (every field optional except ``finished``, which defaults to False)."""

    method: str | None = None
    rank: int | None = None
    trainable_params: int | None = None
    base_greedy_accuracy: float | None = None
    base_pass_at_k: float | None = None
    final_greedy_accuracy: float | None = None
    final_pass_at_k: float | None = None
    k: int | None = None
    mean_train_reward: float | None = None
    mean_weight_gini: float | None = None
    mean_effective_token_ratio: float | None = None
    steps: int | None = None
    wall_time_s: float | None = None
    finished: bool = False


@dataclasses.dataclass
class Run:
    """One loaded run directory.

    name: the directory's name (made unique by ``load_runs`` when several share one).
    config: the resolved config as a nested dict.
    notes: problems that were tolerated while loading (truncated lines, repeated steps, ...).
    """

    name: str
    path: Path
    config: dict
    metrics: Metrics
    evals: tuple[EvalPoint, ...]
    samples: tuple[Sample, ...]
    summary: Summary | None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def method(self) -> str:
        return str(config_get(self.config, "grpo.weighting"))

    @property
    def rank(self) -> int:
        return int(config_get(self.config, "lora.rank"))

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.summary.finished

    @property
    def steps_done(self) -> int:
        """Number of training steps logged in metrics.jsonl."""
        return len(self.metrics)

    @property
    def steps_planned(self) -> int | None:
        steps = config_get(self.config, "train.steps")
        if _is_int(steps):
            return int(steps)
        return self.summary.steps if self.summary is not None else None

    @property
    def model(self) -> str | None:
        return _opt_str(config_get(self.config, "model.path"))

    @property
    def task(self) -> str | None:
        return _opt_str(config_get(self.config, "task.name"))

    @property
    def seed(self) -> int | None:
        seed = config_get(self.config, "train.seed")
        return int(seed) if _is_int(seed) else None

    @property
    def label(self) -> str:
        """Short arm name for plots, e.g. ``ARCA r16``."""
        return arm_label(self.method, self.rank)


def config_get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``dotted = "a.b"``; ``default`` when any level is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def arm_label(method: str, rank: int) -> str:
    """``ARCA r16``, ``surprisal r64``."""
    return f"{METHOD_LABELS.get(method, method)} r{rank}"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _opt_str(x: Any) -> str | None:
    return None if x is None else str(x)


def _field_number(rec: Mapping[str, Any], key: str, where: str) -> float | None:
    """rec[key] as float, None when absent or null; ValueError when it is not a number."""
    v = rec.get(key)
    if v is None:
        return None
    if not _is_number(v):
        raise ValueError(f"{where}: {key} must be a number or null, got {v!r}")
    return float(v)


def _field_int(rec: Mapping[str, Any], key: str, where: str, *, required: bool = False
               ) -> int | None:
    """rec[key] as int (integral floats accepted), None when absent/null unless required."""
    v = rec.get(key)
    if v is None:
        if required:
            raise ValueError(f"{where}: missing {key!r}")
        return None
    if _is_number(v) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{where}: {key} must be an integer, got {v!r}")


def _read_jsonl(path: Path, notes: list[str]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file.

    An unparsable last line (a writer killed mid-line) is skipped with a note; any other
    unparsable line, or a line that is not a JSON object, raises ValueError naming file and line.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = [(i + 1, ln) for i, ln in enumerate(raw.split(b"\n")) if ln.strip()]
    out = []
    for j, (lineno, ln) in enumerate(lines):
        try:
            obj = json.loads(ln.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if j == len(lines) - 1:
                notes.append(f"{path}: ignored an incomplete last line {lineno} "
                             f"(run killed while writing?)")
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out


def _dedupe_by_step(items: list[tuple[int, Any]], path: Path, notes: list[str]) -> list[Any]:
    """Keeps the last item per step (a resumed run re-logs steps), sorted by step."""
    by_step: dict[int, Any] = {}
    repeated: set[int] = set()
    for step, item in items:
        if step in by_step:
            repeated.add(step)
        by_step[step] = item
    if repeated:
        notes.append(f"{path}: steps {_ranges(sorted(repeated))} logged more than once "
                     f"(resumed run?); the later records are used")
    return [by_step[s] for s in sorted(by_step)]


def _ranges(xs: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


def load_config(path: Path) -> dict:
    """Reads config.yaml; checks for a known grpo.weighting and a positive lora.rank."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (is {path.parent} a run directory?)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    method = config_get(config, "grpo.weighting")
    if method not in MODES:
        raise ValueError(f"{path}: grpo.weighting is {method!r}, expected one of {list(MODES)}")
    rank = config_get(config, "lora.rank")
    if not _is_int(rank) or rank <= 0:
        raise ValueError(f"{path}: lora.rank is {rank!r}, expected a positive integer")
    return config


def load_metrics(path: Path, notes: list[str]) -> Metrics:
    """Reads metrics.jsonl (required; may be empty for a run that has not finished a step)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (is {path.parent} a run directory?)")
    items = []
    for lineno, rec in _read_jsonl(path, notes):
        where = f"{path}:{lineno}"
        step = _field_int(rec, "step", where, required=True)
        for key in _METRIC_NUMBER_KEYS:
            _field_number(rec, key, where)
        items.append((step, rec))
    return Metrics(tuple(_dedupe_by_step(items, path, notes)))


def load_evals(path: Path, notes: list[str]) -> tuple[EvalPoint, ...]:
    """Reads eval.jsonl; a missing file gives no evaluations (with a note)."""
    if not path.is_file():
        notes.append(f"{path}: missing; no held-out accuracy for this run")
        return ()
    items = []
    for lineno, rec in _read_jsonl(path, notes):
        where = f"{path}:{lineno}"
        point = EvalPoint(
            step=_field_int(rec, "step", where, required=True),
            greedy_accuracy=_field_number(rec, "greedy_accuracy", where),
            pass_at_k=_field_number(rec, "pass_at_k", where),
            k=_field_int(rec, "k", where),
            num_problems=_field_int(rec, "num_problems", where),
        )
        items.append((point.step, point))
    return tuple(_dedupe_by_step(items, path, notes))


def _parse_sample(rec: Mapping[str, Any], where: str) -> Sample:
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where}: tokens must be a list of strings")
    weights = rec.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{where}: weights must be an object {{mode: [float per token]}}")
    parsed = {}
    for mode, w in weights.items():
        if not isinstance(w, list) or not all(x is None or _is_number(x) for x in w):
            raise ValueError(f"{where}: weights[{mode!r}] must be a list of numbers")
        if len(w) != len(tokens):
            raise ValueError(f"{where}: weights[{mode!r}] has {len(w)} values for "
                             f"{len(tokens)} tokens")
        parsed[str(mode)] = tuple(math.nan if x is None else float(x) for x in w)
    return Sample(
        step=_field_int(rec, "step", where, required=True),
        prompt=str(rec.get("prompt", "")),
        completion=str(rec.get("completion", "")),
        reward=_field_number(rec, "reward", where),
        tokens=tuple(tokens),
        weights=parsed,
    )


def load_samples(path: Path, notes: list[str]) -> tuple[Sample, ...]:
    """Reads samples.jsonl (all records, sorted by step, stable); missing file gives none."""
    if not path.is_file():
        return ()
    samples = [_parse_sample(rec, f"{path}:{lineno}") for lineno, rec in _read_jsonl(path, notes)]
    return tuple(sorted(samples, key=lambda s: s.step))


def load_summary(path: Path, notes: list[str]) -> Summary | None:
    """Reads summary.json; missing gives None, unparsable gives None with a note."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path}: not valid JSON ({e}); treating the run as unfinished")
        return None
    if not isinstance(rec, dict):
        notes.append(f"{path}: not a JSON object; treating the run as unfinished")
        return None
    where = str(path)
    finished = rec.get("finished", False)
    if not isinstance(finished, bool):
        raise ValueError(f"{where}: finished must be true or false, got {finished!r}")
    return Summary(
        method=_opt_str(rec.get("method")),
        rank=_field_int(rec, "rank", where),
        trainable_params=_field_int(rec, "trainable_params", where),
        base_greedy_accuracy=_field_number(rec, "base_greedy_accuracy", where),
        base_pass_at_k=_field_number(rec, "base_pass_at_k", where),
        final_greedy_accuracy=_field_number(rec, "final_greedy_accuracy", where),
        final_pass_at_k=_field_number(rec, "final_pass_at_k", where),
        k=_field_int(rec, "k", where),
        mean_train_reward=_field_number(rec, "mean_train_reward", where),
        mean_weight_gini=_field_number(rec, "mean_weight_gini", where),
        mean_effective_token_ratio=_field_number(rec, "mean_effective_token_ratio", where),
        steps=_field_int(rec, "steps", where),
        wall_time_s=_field_number(rec, "wall_time_s", where),
        finished=finished,
    )


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Loads one run directory (see the module docstring for what is an error and what a note)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    notes: list[str] = []
    config = load_config(path / CONFIG_FILE)
    return Run(
        name=name or path.resolve().name,
        path=path,
        config=config,
        metrics=load_metrics(path / METRICS_FILE, notes),
        evals=load_evals(path / EVAL_FILE, notes),
        samples=load_samples(path / SAMPLES_FILE, notes),
        summary=load_summary(path / SUMMARY_FILE, notes),
        notes=notes,
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, prefixed with the parent's name (or made the full path) where they clash."""
    resolved = [p.resolve() for p in paths]
    names = [p.name for p in resolved]
    names = [f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n
             for p, n in zip(resolved, names)]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(resolved, names)]


def load_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Loads several run directories (in the given order) with unique names."""
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise ValueError("no run directories given")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ValueError(f"{p}: given more than once")
        seen[key] = p
    return [load_run(p, name) for p, name in zip(paths, _unique_names(paths))]


def sort_runs(runs: Iterable[Run]) -> list[Run]:
    """Paper order: uniform, surprisal, entropy reduction, divergence, ARCA; then rank, name."""
    return sorted(runs, key=lambda r: (MODES.index(r.method), r.rank, r.name))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerformanceRow:
    """One row of the held-out performance table (None = not known)."""

    run: str
    method: str
    rank: int
    trainable_params: int | None
    greedy_accuracy: float | None
    pass_at_k: float | None
    k: int | None
    mean_train_reward: float | None
    base_greedy_accuracy: float | None
    base_pass_at_k: float | None
    eval_step: int | None
    steps_done: int
    steps_planned: int | None
    finished: bool
    model: str | None
    task: str | None
    seed: int | None


@dataclasses.dataclass(frozen=True)
class DiagnosticsRow:
    """One row of the token-weight diagnostics table (means over the logged training steps)."""

    run: str
    method: str
    rank: int
    gini: float | None
    effective_token_ratio: float | None
    residual_norm_mean: float | None
    steps_done: int
    steps_planned: int | None
    finished: bool


def _first_known(*values: Any) -> Any:
    """The first argument that is not None (None if all are)."""
    return next((v for v in values if v is not None), None)


def _summary_value(run: Run, field: str) -> Any:
    """The summary's ``field`` for finished runs; None for unfinished ones."""
    return getattr(run.summary, field) if run.finished else None


def _latest_eval(run: Run) -> EvalPoint | None:
    """The last evaluation after training started (step > 0), if any."""
    after = [e for e in run.evals if e.step > 0]
    return after[-1] if after else None


def _base_eval(run: Run) -> EvalPoint | None:
    return next((e for e in run.evals if e.step == 0), None)


def performance_row(run: Run) -> PerformanceRow:
    """Held-out performance of one run (summary first for finished runs, else the logs)."""
    last, base = _latest_eval(run), _base_eval(run)
    eval_step = _first_known(last.step if last else None, _summary_value(run, "steps"))
    return PerformanceRow(
        run=run.name,
        method=run.method,
        rank=run.rank,
        trainable_params=run.summary.trainable_params if run.summary is not None else None,
        greedy_accuracy=_first_known(_summary_value(run, "final_greedy_accuracy"),
                                     last.greedy_accuracy if last else None),
        pass_at_k=_first_known(_summary_value(run, "final_pass_at_k"),
                               last.pass_at_k if last else None),
        k=_first_known(_summary_value(run, "k"), last.k if last else None,
                       base.k if base else None),
        mean_train_reward=_first_known(_summary_value(run, "mean_train_reward"),
                                       run.metrics.mean("reward_mean")),
        base_greedy_accuracy=_first_known(_summary_value(run, "base_greedy_accuracy"),
                                          base.greedy_accuracy if base else None),
        base_pass_at_k=_first_known(_summary_value(run, "base_pass_at_k"),
                                    base.pass_at_k if base else None),
        eval_step=eval_step,
        steps_done=run.steps_done,
        steps_planned=run.steps_planned,
        finished=run.finished,
        model=run.model,
        task=run.task,
        seed=run.seed,
    )


def diagnostics_row(run: Run) -> DiagnosticsRow:
    """Gini and EffN/T of one run, averaged over its logged training steps."""
    return DiagnosticsRow(
        run=run.name,
        method=run.method,
        rank=run.rank,
        gini=_first_known(_summary_value(run, "mean_weight_gini"),
                          run.metrics.mean("weight_gini")),
        effective_token_ratio=_first_known(_summary_value(run, "mean_effective_token_ratio"),
                                           run.metrics.mean("effective_token_ratio")),
        residual_norm_mean=run.metrics.mean("residual_norm_mean"),
        steps_done=run.steps_done,
        steps_planned=run.steps_planned,
        finished=run.finished,
    )


def performance_table(runs: Iterable[Run]) -> list[PerformanceRow]:
    """The paper's performance table for ``runs``, in the paper's order."""
    return [performance_row(r) for r in sort_runs(runs)]


def diagnostics_table(runs: Iterable[Run]) -> list[DiagnosticsRow]:
    """The paper's diagnostics table for ``runs``, in the paper's order."""
    return [diagnostics_row(r) for r in sort_runs(runs)]


def _close(a: float | None, b: float | None) -> bool:
    return a is None or b is None or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def consistency_notes(run: Run) -> list[str]:
    """Where a finished run's summary.json disagrees with its logs or config (empty if nowhere)."""
    if run.summary is None:
        return []
    s, notes = run.summary, []
    last, base = _latest_eval(run), _base_eval(run)
    checks = [
        ("final_greedy_accuracy", s.final_greedy_accuracy, last.greedy_accuracy if last else None),
        ("final_pass_at_k", s.final_pass_at_k, last.pass_at_k if last else None),
        ("base_greedy_accuracy", s.base_greedy_accuracy, base.greedy_accuracy if base else None),
        ("mean_train_reward", s.mean_train_reward, run.metrics.mean("reward_mean")),
        ("mean_weight_gini", s.mean_weight_gini, run.metrics.mean("weight_gini")),
        ("mean_effective_token_ratio", s.mean_effective_token_ratio,
         run.metrics.mean("effective_token_ratio")),
    ]
    for key, said, logged in checks:
        if not _close(said, logged):
            notes.append(f"{run.name}: summary.json has {key} = {said:.6g} but the logs give "
                         f"{logged:.6g}" + ("; the table uses the summary" if run.finished else ""))
    if s.method is not None and s.method != run.method:
        notes.append(f"{run.name}: summary.json says method {s.method!r}, config.yaml "
                     f"{run.method!r}; the config is used")
    if s.rank is not None and s.rank != run.rank:
        notes.append(f"{run.name}: summary.json says rank {s.rank}, config.yaml {run.rank}; "
                     f"the config is used")
    if run.finished and s.steps is not None and run.steps_done < s.steps:
        notes.append(f"{run.name}: summary.json says {s.steps} steps but metrics.jsonl has "
                     f"{run.steps_done}")
    return notes


# ---------------------------------------------------------------------------------------------
# Formatting and writers
# ---------------------------------------------------------------------------------------------


def format_params(n: int | None) -> str:
    """69_730_304 -> '69.7M', 4_358_144 -> '4.36M' (three significant digits, like the paper)."""
    if n is None:
        return "n/a"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        v = float(f"{n / scale:.3g}")  # rounded first: 999_999 is '1M', not '1e+03K'
        if abs(v) >= 1:
            return f"{v:g}{unit}"
    return str(n)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text  # no "-0.000"


def _status(steps_done: int, steps_planned: int | None, finished: bool) -> str:
    planned = "?" if steps_planned is None else str(steps_planned)
    return f"{steps_done}/{planned}" + ("" if finished else " (unfinished)")


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table ('|' in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pass_header(ks: Iterable[int | None]) -> tuple[str, bool]:
    """('pass@4', False) when all runs share k, else ('pass@k', True): k shown per cell."""
    known = {k for k in ks if k is not None}
    if len(known) == 1:
        return f"pass@{known.pop()}", False
    return "pass@k", bool(known)


def performance_markdown(rows: Sequence[PerformanceRow]) -> str:
    """The performance table as Markdown (3 decimals; unfinished runs marked in 'steps')."""
    header, per_cell_k = _pass_header(r.k for r in rows)
    body = []
    for r in rows:
        pass_cell = _fmt(r.pass_at_k)
        if per_cell_k and r.pass_at_k is not None:
            pass_cell += f" (k={r.k if r.k is not None else '?'})"
        acc_note = "" if r.finished or r.eval_step is None else f" (step {r.eval_step})"
        body.append([METHOD_LABELS[r.method], r.rank, format_params(r.trainable_params),
                     _fmt(r.greedy_accuracy) + acc_note, pass_cell, _fmt(r.mean_train_reward),
                     _status(r.steps_done, r.steps_planned, r.finished), r.run])
    return markdown_table(["method", "rank", "trainable params", "greedy", header,
                           "mean train reward", "steps", "run"], body)


def diagnostics_markdown(rows: Sequence[DiagnosticsRow]) -> str:
    """The diagnostics table as Markdown (means over the logged training steps)."""
    body = [[METHOD_LABELS[r.method], r.rank, _fmt(r.gini), _fmt(r.effective_token_ratio),
             _status(r.steps_done, r.steps_planned, r.finished), r.run] for r in rows]
    return markdown_table(["method", "rank", "Gini", "EffN/T", "steps", "run"], body)


def _csv_value(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return repr(x)
    return str(x)


def write_csv(path: Path, rows: Sequence[Any], row_type: type) -> Path:
    """Rows of a dataclass as CSV, one column per field; None is empty, floats at full precision."""
    fields = [f.name for f in dataclasses.fields(row_type)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_csv_value(getattr(row, name)) for name in fields])
    return path


# ---------------------------------------------------------------------------------------------
# Ours beside the paper's
# ---------------------------------------------------------------------------------------------


def _setting_line(run: Run) -> str:
    planned = "?" if run.steps_planned is None else run.steps_planned
    return (f"`{run.name}`: model `{run.model or '?'}`, task `{run.task or '?'}`, "
            f"{run.steps_done}/{planned} steps" + ("" if run.finished else " (unfinished)") + ", "
            f"seed {run.seed if run.seed is not None else '?'}, directory `{run.path}`")


def _same_as_paper(run: Run) -> bool:
    task = (run.task or "").lower()
    return (run.model == PAPER_SETTING.model and task in ("math", "hendrycks_math")
            and run.steps_planned == PAPER_SETTING.steps)


def comparison_markdown(runs: Sequence[Run]) -> str:
    """Our tables beside the paper's published numbers, saying plainly what each column is."""
    runs = sort_runs(runs)
    perf = {r.run: r for r in performance_table(runs)}
    diag = {r.run: r for r in diagnostics_table(runs)}
    keys = [(p.method, p.rank) for p in PAPER_PERFORMANCE]
    keys += sorted({(r.method, r.rank) for r in runs} - set(keys),
                   key=lambda k: (MODES.index(k[0]), k[1]))
    paper_perf = {(p.method, p.rank): p for p in PAPER_PERFORMANCE}
    paper_diag = {(p.method, p.rank): p for p in PAPER_DIAGNOSTICS}
    header, _ = _pass_header(r.k for r in perf.values())

    perf_rows, diag_rows = [], []
    for key in keys:
        ours = [r for r in runs if (r.method, r.rank) == key] or [None]
        pp, pd = paper_perf.get(key), paper_diag.get(key)
        for run in ours:
            o, d = (perf[run.name], diag[run.name]) if run else (None, None)
            name = run.name if run else "not run"
            perf_rows.append([
                METHOD_LABELS[key[0]], key[1],
                _fmt(pp.greedy_accuracy) if pp else "—", _fmt(o.greedy_accuracy) if o else "—",
                _fmt(pp.pass_at_k) if pp else "—", _fmt(o.pass_at_k) if o else "—",
                _fmt(pp.mean_train_reward) if pp else "—",
                _fmt(o.mean_train_reward) if o else "—", name])
            diag_rows.append([
                METHOD_LABELS[key[0]], key[1],
                _fmt(pd.gini) if pd else "—", _fmt(d.gini) if d else "—",
                _fmt(pd.effective_token_ratio) if pd else "—",
                _fmt(d.effective_token_ratio) if d else "—", name])

    ps = PAPER_SETTING
    lines = [
        "# Our runs beside the paper's published numbers",
        "",
        f"- **paper** columns: the numbers published in arXiv 2606.00257 (ARCA), not re-run "
        f"here: {ps.model} on {ps.task}, GRPO, seed {ps.seed}, {ps.steps} steps, held-out "
        f"accuracy on {ps.eval_problems} problems, pass@{ps.k}; one seed.",
        "- **ours** columns: computed by arca-jax from these run directories (setting read from "
        "each run's config.yaml):",
        *[f"  - {_setting_line(r)}" for r in runs],
    ]
    if not all(_same_as_paper(r) for r in runs):
        lines.append("- Our setting differs from the paper's (model, task or steps), so compare "
                     "the pattern across methods (e.g. which weightings degenerate), not the "
                     "values.")
    if any(not r.finished for r in runs):
        lines.append("- Unfinished runs are included with what they have logged so far.")
    lines += [
        "", "## Held-out performance", "",
        markdown_table(["method", "rank", "greedy (paper)", "greedy (ours)", f"pass@{ps.k} (paper)",
                        f"{header} (ours)", "mean train reward (paper)",
                        "mean train reward (ours)", "our run"], perf_rows),
        "## Token-weight diagnostics (averaged over training)", "",
        markdown_table(["method", "rank", "Gini (paper)", "Gini (ours)", "EffN/T (paper)",
                        "EffN/T (ours)", "our run"], diag_rows),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


class ReportError(RuntimeError):
    """A report could not be made for a reason other than bad input (e.g. no matplotlib)."""


def _new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, without pyplot or global backend changes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError("the report's plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _mpl_text(s: str) -> str:
    """Escapes '$' so that matplotlib does not read labels as mathtext."""
    return s.replace("$", r"\$")


def _arm_labels(runs: Sequence[Run]) -> list[str]:
    """``ARCA r16``, with the run name appended where two runs would share a label."""
    labels = [r.label for r in runs]
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


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)


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


# ---------------------------------------------------------------------------------------------
# Credit heatmap
# ---------------------------------------------------------------------------------------------


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


def _row_caption(row: HeatmapRow) -> str:
    return (f"{METHOD_LABELS.get(row.mode, row.mode)}: Gini {_fmt(row.gini, 2)}, "
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
    title += [_row_caption(r) for r in rows]
    fig.text(0.01, 1 - 0.1 / fig_h, "\n".join(title), va="top", ha="left", fontsize=7.5,
             parse_math=False)
    if not rows:
        _no_data(ax)

    for li, line in enumerate(lines):
        for ri, row in enumerate(rows):
            y = li * band + ri
            ax.text(-1.0, y + 0.45, METHOD_LABELS.get(row.mode, row.mode), ha="right",
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
        caption = html.escape(_row_caption(row)).replace(": ", ":<br>", 1)
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


# ---------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReportPaths:
    """Files ``write_report`` wrote (heatmap paths are None when no run logged samples)."""

    report_md: Path
    performance_md: Path
    performance_csv: Path
    diagnostics_md: Path
    diagnostics_csv: Path
    comparison_md: Path
    reward_accuracy_png: Path
    weight_diagnostics_png: Path
    heatmap_png: Path | None
    heatmap_html: Path | None
    notes: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        """Every file written, report.md first."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "notes" and getattr(self, f.name) is not None]


def _report_markdown(runs: Sequence[Run], perf_md: str, diag_md: str,
                     choice: HeatmapChoice | None, notes: Sequence[str]) -> str:
    lines = [
        "# arca-jax report", "",
        "Runs (setting from each run's config.yaml; all numbers below are ours, computed from "
        "these directories):", "",
        *[f"- {_setting_line(r)}" for r in sort_runs(runs)], "",
        "## Held-out performance", "",
        "Greedy accuracy and pass@k at the end of training (latest evaluation for unfinished "
        "runs); mean train reward over the logged steps. "
        "[performance.md](performance.md), [performance.csv](performance.csv)", "",
        perf_md,
        "## Token-weight diagnostics", "",
        "Gini and EffN/T of the token weights, averaged over the logged training steps. "
        "[diagnostics.md](diagnostics.md), [diagnostics.csv](diagnostics.csv)", "",
        diag_md,
        "## Beside the paper", "",
        "[comparison.md](comparison.md) puts these numbers beside the paper's published ones.", "",
        "## Curves", "",
        "![reward and accuracy](reward_accuracy.png)", "",
        "![Gini and EffN/T](weight_diagnostics.png)", "",
        "## Credit heatmap", "",
    ]
    if choice is None:
        lines += ["No run logged samples (samples.jsonl), so there is no heatmap.", ""]
    else:
        lines += [f"{_choice_caption(choice)}. Interactive version: [heatmap.html](heatmap.html).",
                  "", "![credit heatmap](heatmap.png)", ""]
    if notes:
        lines += ["## Notes on the inputs", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path, *,
                 heatmap_run: str | None = None, heatmap_step: int | None = None,
                 heatmap_index: int | None = None, max_heatmap_tokens: int = 256
                 ) -> ReportPaths:
    """Loads the runs and writes the whole report into ``out_dir`` (created if needed).

    The heatmap_* arguments override the completion the heatmap shows (see ``choose_sample``).
    Raises ValueError for bad input (unreadable run directories, a bad heatmap choice, an
    ``out_dir`` that is not a directory); existing report files in ``out_dir`` are overwritten.
    """
    if max_heatmap_tokens < 1:
        raise ValueError(f"max_heatmap_tokens must be >= 1, got {max_heatmap_tokens}")
    runs = sort_runs(load_runs(run_dirs))
    choice = choose_sample(runs, heatmap_run, heatmap_step, heatmap_index)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{out}: exists and is not a directory") from None
    notes = tuple(n for r in runs for n in r.notes + consistency_notes(r))

    perf, diag = performance_table(runs), diagnostics_table(runs)
    perf_md, diag_md = performance_markdown(perf), diagnostics_markdown(diag)
    (out / "performance.md").write_text("# Held-out performance\n\n" + perf_md, encoding="utf-8")
    (out / "diagnostics.md").write_text("# Token-weight diagnostics (averaged over training)\n\n"
                                        + diag_md, encoding="utf-8")
    (out / "comparison.md").write_text(comparison_markdown(runs), encoding="utf-8")
    write_csv(out / "performance.csv", perf, PerformanceRow)
    write_csv(out / "diagnostics.csv", diag, DiagnosticsRow)
    plot_reward_accuracy(runs, out / "reward_accuracy.png")
    plot_weight_diagnostics(runs, out / "weight_diagnostics.png")
    heat_png = heat_html = None
    if choice is not None:
        heat_png = plot_heatmap(choice, out / "heatmap.png", max_tokens=max_heatmap_tokens)
        heat_html = write_heatmap_html(choice, out / "heatmap.html")
    (out / "report.md").write_text(_report_markdown(runs, perf_md, diag_md, choice, notes),
                                   encoding="utf-8")
    return ReportPaths(
        report_md=out / "report.md",
        performance_md=out / "performance.md", performance_csv=out / "performance.csv",
        diagnostics_md=out / "diagnostics.md", diagnostics_csv=out / "diagnostics.csv",
        comparison_md=out / "comparison.md",
        reward_accuracy_png=out / "reward_accuracy.png",
        weight_diagnostics_png=out / "weight_diagnostics.png",
        heatmap_png=heat_png, heatmap_html=heat_html, notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# Command line: arca-jax report RUN_DIR... --out DIR
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand's arguments to ``parser``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the report (created; report files overwritten)")
    parser.add_argument("--heatmap-run", metavar="NAME",
                        help="run whose sample the heatmap shows (default: the highest-rank "
                             "ARCA run with samples)")
    parser.add_argument("--heatmap-step", type=int, metavar="STEP",
                        help="only consider samples logged at this step")
    parser.add_argument("--heatmap-index", type=int, metavar="I",
                        help="pick this sample (Python index) instead of the latest "
                             "highest-reward one")
    parser.add_argument("--heatmap-max-tokens", type=int, default=256, metavar="N",
                        help="tokens drawn in heatmap.png (default 256; the HTML has all)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the subcommand: 0 on success, 2 for bad input, 1 when the report cannot be made."""
    try:
        paths = write_report(args.run_dirs, args.out, heatmap_run=args.heatmap_run,
                             heatmap_step=args.heatmap_step, heatmap_index=args.heatmap_index,
                             max_heatmap_tokens=args.heatmap_max_tokens)
    except ValueError as e:
        print(f"arca-jax report: error: {e}", file=sys.stderr)
        return 2
    except (ReportError, OSError) as e:
        print(f"arca-jax report: error: {e}", file=sys.stderr)
        return 1
    for note in paths.notes:
        print(f"arca-jax report: note: {note}", file=sys.stderr)
    print(f"wrote {paths.report_md}")
    for p in paths.files()[1:]:
        print(f"  {p}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``arca-jax report`` as a standalone command; returns the exit code."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="arca-jax report",
        description="Tables, curves and a credit heatmap from arca-jax run directories."))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message
        return int(e.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
