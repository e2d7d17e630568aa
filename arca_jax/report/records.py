"""What a run directory holds, as records: the modes, the file names, ``Run`` and its parts.

Nothing here reads files (``load`` does); ``sort_runs`` gives the paper's table order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from arca_jax import rundir


#: The five weightings, in the paper's table order (same as ``arca_jax.credit.MODES``; not imported
#: from there so that reading reports does not import JAX).
MODES: tuple[str, ...] = ("uniform", "surprisal", "entropy_reduction", "divergence", "arca")

def method_order(method: str) -> tuple:
    """Sort key of a method: the paper's five in table order, then any other weighting (a user's
    registered name or "module:attribute" path) by name."""
    return (MODES.index(method), "") if method in MODES else (len(MODES), method)


def method_label(method: str) -> str:
    """The paper's name of a method; other weightings by their configured name."""
    return METHOD_LABELS.get(method, method)


#: Names the paper's tables use for the modes.
METHOD_LABELS: Mapping[str, str] = {
    "uniform": "uniform",
    "surprisal": "surprisal",
    "entropy_reduction": "entropy reduction",
    "divergence": "policy divergence",
    "arca": "ARCA",
}

# The run-directory contract (`arca_jax.rundir`, JAX-free) under the report's names.
METRICS_FILE = rundir.METRICS
EVAL_FILE = rundir.EVAL
SAMPLES_FILE = rundir.SAMPLES
SUMMARY_FILE = rundir.SUMMARY
CONFIG_FILE = rundir.CONFIG


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
    """One held-out evaluation (step 0 is the base model before training).

    greedy, correct_of_k: per problem, in evaluation order, the greedy completion's reward and how
    many of the k samples were correct; None in logs written before the trainer recorded them.
    """

    step: int
    greedy_accuracy: float | None
    pass_at_k: float | None
    k: int | None
    num_problems: int | None
    greedy: tuple[float, ...] | None = None
    correct_of_k: tuple[int, ...] | None = None

    @property
    def per_problem_pass(self) -> tuple[float, ...] | None:
        """Per-problem pass@k, 1.0 where any of the k samples was correct (the trainer draws
        exactly k samples per problem, so the unbiased estimator is this indicator); None when
        the log has no ``correct_of_k``."""
        if self.correct_of_k is None:
            return None
        return tuple(1.0 if c > 0 else 0.0 for c in self.correct_of_k)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One logged completion with the five methods' weights on its tokens."""

    step: int
    prompt: str
    completion: str
    reward: float | None
    tokens: tuple[str, ...]
    weights: Mapping[str, tuple[float, ...]]


# deliberate: a field list like the other records' (each record type lists its own fields)
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
    def variant(self) -> str:
        """The objective's named departures from the paper's GRPO (``objective_tags``), e.g.
        ``"GSPO"``, ``"DAPO"``, ``"layers=all, relative"``; "" for the paper's objective."""
        return ", ".join(objective_tags(self.config))

    @property
    def arca_variant(self) -> str:
        """The ARCA measurement's tags alone (``objective_tags(..., arca_only=True)``): how this
        run's "arca" weights (and its samples' "arca" row) were measured."""
        return ", ".join(objective_tags(self.config, arca_only=True))

    @property
    def label(self) -> str:
        """Short arm name for plots, e.g. ``ARCA r16``, ``uniform r64 [GSPO]``."""
        return arm_label(self.method, self.rank, self.variant)


def config_get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``dotted = "a.b"``; ``default`` when any level is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def objective_tags(config: Mapping[str, Any], *, arca_only: bool = False) -> tuple[str, ...]:
    """Names of the settings by which a run's objective departs from the paper's GRPO, in this
    order: "GSPO" (grpo.ratio_level: sequence), "CISPO" (grpo.policy_loss: cispo), "DAPO"
    (rollout.dynamic_sampling), "TIS" / "MIS" (grpo.behaviour_correction), "dual-clip 3"
    (grpo.clip_ratio_max), "entropy top 0.2" (grpo.top_entropy_quantile < 1), then ARCA's
    measurement: "layers=all" or "layers=0,2" (grpo.arca_layers other than "final") and
    "relative" (grpo.arca_relative).
    Keys a config lacks count as the defaults. ``arca_only``: only the last two."""
    tags = []
    if not arca_only:
        if config_get(config, "grpo.ratio_level", "token") == "sequence":
            tags.append("GSPO")
        if config_get(config, "grpo.policy_loss", "clip") == "cispo":
            tags.append("CISPO")
        if config_get(config, "rollout.dynamic_sampling", False) is True:
            tags.append("DAPO")
        correction = config_get(config, "grpo.behaviour_correction", "none")
        if isinstance(correction, str) and correction != "none":
            tags.append(correction.upper())
        bound = config_get(config, "grpo.clip_ratio_max")
        if isinstance(bound, (int, float)) and not isinstance(bound, bool):
            tags.append(f"dual-clip {bound:g}")
        rho = config_get(config, "grpo.top_entropy_quantile", 1.0)
        if isinstance(rho, (int, float)) and not isinstance(rho, bool) and rho < 1.0:
            tags.append(f"entropy top {rho:g}")
    layers = config_get(config, "grpo.arca_layers", "final")
    if isinstance(layers, (list, tuple)):
        tags.append("layers=" + ",".join(str(i) for i in layers))
    elif layers != "final":
        tags.append(f"layers={layers}")
    if config_get(config, "grpo.arca_relative", False) is True:
        tags.append("relative")
    return tuple(tags)


def arm_label(method: str, rank: int, variant: str = "") -> str:
    """``ARCA r16``, ``surprisal r64``; with a variant (``Run.variant``) ``uniform r64 [GSPO]``."""
    return f"{method_label(method)} r{rank}" + (f" [{variant}]" if variant else "")


def method_cell(method: str, variant: str = "") -> str:
    """A table's method column: ``ARCA``, ``ARCA [layers=all]``, ``uniform [DAPO]``."""
    return method_label(method) + (f" [{variant}]" if variant else "")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_str(x: Any) -> str | None:
    return None if x is None else str(x)


def sort_runs(runs: Iterable[Run]) -> list[Run]:
    """Paper order: uniform, surprisal, entropy reduction, divergence, ARCA, then other
    weightings by name; then rank, name."""
    return sorted(runs, key=lambda r: (method_order(r.method), r.rank, r.name))
