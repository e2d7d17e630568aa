"""Seeds and intervals: per-arm means over seeds with 95% bootstrap intervals, and each arm's
paired difference from uniform (``intervals.csv``, ``paired.csv``, report.md's sections).

The bootstrap (numpy only, deterministic: a fixed RNG seed, a fresh generator per quantity):

- Accuracies (greedy, pass@k) at the end of training, from ``eval.jsonl``'s per-problem results
  of each run's last evaluation: a matrix X [seeds, problems]. Each of ``BOOTSTRAP_RESAMPLES``
  resamples draws S seeds with replacement, then, for each drawn seed, P problems with replacement
  from that seed's row; its statistic is the mean of the S x P drawn cells. The interval is the
  2.5 and 97.5 percentiles of the statistics (``np.percentile``, linear). With one seed this is a
  bootstrap over problems only. Per-problem pass@k is 1 where any of the k samples was correct.
- Runs without per-problem results (logs from before the trainer wrote them): X is [seeds, 1],
  each run's accuracy, so the same procedure is a bootstrap over seeds only; with one seed there
  is no interval.
- Train reward, Gini and EffN/T (one value per run, a mean over its training steps): the bootstrap
  over seeds only, X [seeds, 1]; no interval with one seed.
- Paired against uniform: X = the arm's per-problem results minus the uniform arm's, for the
  seeds both arms ran (both evaluate the same problems in the same order), same bootstrap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from arca_jax.report.arms import Arm
from arca_jax.report.records import Run
from arca_jax.report.tables import (_fmt, _latest_eval, diagnostics_row, markdown_table,
                                    performance_row)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240607  # fixed: the same inputs give the same report
LEVEL = 0.95

# How an interval was computed ("kind" columns).
OVER_SEEDS_AND_PROBLEMS = "seeds x problems"
OVER_PROBLEMS = "problems (1 seed)"
OVER_SEEDS = "seeds"
OVER_SEEDS_NO_PROBLEMS = "seeds (no per-problem results)"
NO_INTERVAL = "none (1 seed)"
NO_INTERVAL_NO_PROBLEMS = "none (1 seed, no per-problem results)"
NO_DATA = "none (no values)"


def bootstrap_means(x: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples] bootstrap means of ``x`` [S, P]: per resample, S rows drawn with replacement,
    then P columns drawn with replacement independently for each drawn row (in that order from
    ``np.random.default_rng(seed)``); the statistic is the mean of the S x P drawn cells."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"need a non-empty [seeds, problems] matrix, got shape {x.shape}")
    s_count, p_count = x.shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    for b in range(resamples):
        rows = rng.integers(0, s_count, size=s_count)
        cols = rng.integers(0, p_count, size=(s_count, p_count))
        out[b] = x[rows[:, None], cols].mean()
    return out


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap statistics."""
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval (lo/hi None: no interval) and how the interval was made;
    share_below_0: the fraction of bootstrap statistics below 0 (paired differences only)."""

    mean: float | None
    lo: float | None
    hi: float | None
    kind: str
    units: int = 0  # seeds behind the estimate
    problems: int | None = None
    share_below_0: float | None = None


def estimate(x: np.ndarray | None, kind: str, *, with_share: bool = False) -> Estimate:
    """Mean of ``x`` [S, P] with the bootstrap interval; no interval for kinds starting 'none'."""
    if x is None or x.size == 0:
        return Estimate(None, None, None, NO_DATA)
    mean = float(x.mean())
    problems = x.shape[1] if kind in (OVER_SEEDS_AND_PROBLEMS, OVER_PROBLEMS) else None
    if kind.startswith("none"):
        return Estimate(mean, None, None, kind, x.shape[0], problems)
    stats = bootstrap_means(x)
    lo, hi = percentile_interval(stats)
    share = float(np.mean(stats < 0)) if with_share else None
    return Estimate(mean, lo, hi, kind, x.shape[0], problems, share)


def _per_problem(run: Run, metric: str) -> tuple[float, ...] | None:
    """The run's per-problem results ("greedy" or "pass") at its last evaluation after step 0."""
    e = _latest_eval(run)
    if e is None:
        return None
    return e.greedy if metric == "greedy" else e.per_problem_pass


def _run_value(run: Run, metric: str) -> float | None:
    if metric == "greedy":
        return performance_row(run).greedy_accuracy
    if metric == "pass":
        return performance_row(run).pass_at_k
    if metric == "reward":
        return performance_row(run).mean_train_reward
    d = diagnostics_row(run)
    return d.gini if metric == "gini" else d.effective_token_ratio


def accuracy_matrix(runs: Sequence[Run], metric: str) -> tuple[np.ndarray | None, str]:
    """X [S, P] of per-problem results ("greedy" or "pass") of ``runs`` when every run has them
    with one length, else X [S, 1] of the runs' accuracies; and the interval's kind."""
    rows = [_per_problem(r, metric) for r in runs]
    if runs and all(rows) and len({len(r) for r in rows}) == 1:
        return (np.array(rows, dtype=np.float64),
                OVER_SEEDS_AND_PROBLEMS if len(runs) > 1 else OVER_PROBLEMS)
    return seed_matrix(runs, metric, no_problems=True)


def seed_matrix(runs: Sequence[Run], metric: str, *, no_problems: bool = False
                ) -> tuple[np.ndarray | None, str]:
    """X [S, 1] of one value per run (the runs that have it) and the interval's kind."""
    vals = [v for v in (_run_value(r, metric) for r in runs)
            if v is not None and not math.isnan(v)]
    if not vals:
        return None, NO_DATA
    if len(vals) == 1:
        return np.array([vals]).T, NO_INTERVAL_NO_PROBLEMS if no_problems else NO_INTERVAL
    return np.array([vals]).T, OVER_SEEDS_NO_PROBLEMS if no_problems else OVER_SEEDS


@dataclasses.dataclass(frozen=True)
class IntervalRow:
    """One arm over its seeds (``intervals.csv``): mean, 95% interval lo/hi, how it was made."""

    arm: str
    method: str
    rank: int
    seeds: int
    seed_list: str
    runs: str
    finished: bool
    problems: int | None
    k: int | None
    accuracy_interval: str
    greedy_mean: float | None
    greedy_lo: float | None
    greedy_hi: float | None
    pass_at_k_mean: float | None
    pass_at_k_lo: float | None
    pass_at_k_hi: float | None
    seed_interval: str
    train_reward_mean: float | None
    train_reward_lo: float | None
    train_reward_hi: float | None
    gini_mean: float | None
    gini_lo: float | None
    gini_hi: float | None
    effective_token_ratio_mean: float | None
    effective_token_ratio_lo: float | None
    effective_token_ratio_hi: float | None


def _seed_text(seeds: Sequence[int | None]) -> str:
    return " ".join("?" if s is None else str(s) for s in seeds)


def interval_row(arm: Arm) -> IntervalRow:
    """The arm's means over seeds with their intervals (see the module docstring)."""
    runs = list(arm.runs)
    greedy = estimate(*accuracy_matrix(runs, "greedy"))
    passk = estimate(*accuracy_matrix(runs, "pass"))
    reward, gini_, effn = (estimate(*seed_matrix(runs, m)) for m in ("reward", "gini", "effn"))
    ks = {performance_row(r).k for r in runs} - {None}
    return IntervalRow(
        arm=arm.label, method=arm.method, rank=arm.rank, seeds=len(runs),
        seed_list=_seed_text(arm.seeds), runs=" ".join(r.name for r in runs),
        finished=all(r.finished for r in runs), problems=greedy.problems,
        k=ks.pop() if len(ks) == 1 else None, accuracy_interval=greedy.kind,
        greedy_mean=greedy.mean, greedy_lo=greedy.lo, greedy_hi=greedy.hi,
        pass_at_k_mean=passk.mean, pass_at_k_lo=passk.lo, pass_at_k_hi=passk.hi,
        seed_interval=OVER_SEEDS if len(runs) > 1 else NO_INTERVAL,
        train_reward_mean=reward.mean, train_reward_lo=reward.lo, train_reward_hi=reward.hi,
        gini_mean=gini_.mean, gini_lo=gini_.lo, gini_hi=gini_.hi,
        effective_token_ratio_mean=effn.mean, effective_token_ratio_lo=effn.lo,
        effective_token_ratio_hi=effn.hi)


def interval_table(arms: Sequence[Arm]) -> list[IntervalRow]:
    return [interval_row(a) for a in arms]


# --- paired against uniform ------------------------------------------------------------------


def reference_arm(arm: Arm, arms: Sequence[Arm]) -> Arm | None:
    """The uniform arm to compare ``arm`` with: the one whose config differs from the arm's in
    the fewest settings besides grpo.weighting (same rank, logits dtype, ...); ties: the first in
    table order; None without a uniform arm."""
    uniforms = [a for a in arms if a.method == "uniform" and a is not arm]
    if not uniforms:
        return None
    missing = object()

    def distance(u: Arm) -> int:
        keys = (set(u.settings) | set(arm.settings)) - {"grpo.weighting"}
        return sum(u.settings.get(k, missing) != arm.settings.get(k, missing) for k in keys)

    return min(uniforms, key=distance)


@dataclasses.dataclass(frozen=True)
class PairedRow:
    """Arm minus uniform, paired by seed and problem (``paired.csv``)."""

    arm: str
    reference: str
    seeds: int
    seed_list: str
    problems: int | None
    interval: str
    greedy_diff: float | None
    greedy_diff_lo: float | None
    greedy_diff_hi: float | None
    greedy_share_below_0: float | None
    pass_at_k_diff: float | None
    pass_at_k_diff_lo: float | None
    pass_at_k_diff_hi: float | None
    pass_at_k_share_below_0: float | None


def _by_seed(arm: Arm, notes: list[str]) -> dict[int | None, Run]:
    out: dict[int | None, Run] = {}
    for r in arm.runs:
        if r.seed in out:
            notes.append(f"{arm.label}: seed {r.seed} appears in several runs ({out[r.seed].name}, "
                         f"{r.name}); the paired comparison uses {out[r.seed].name}")
            continue
        out[r.seed] = r
    return out


def paired_difference(arm_runs: Sequence[Run], ref_runs: Sequence[Run], metric: str
                      ) -> tuple[np.ndarray | None, str]:
    """X [S, P]: arm minus reference per seed (row i pairs arm_runs[i] with ref_runs[i]) and
    problem, when every run has per-problem results of one length; else X [S', 1]: the per-seed
    accuracy differences of the S' pairs where both runs have an accuracy. And its kind."""
    pa = [_per_problem(r, metric) for r in arm_runs]
    pb = [_per_problem(r, metric) for r in ref_runs]
    if pa and all(pa) and all(pb) and len({len(x) for x in pa + pb}) == 1:
        d = np.array(pa, dtype=np.float64) - np.array(pb, dtype=np.float64)
        return d, OVER_SEEDS_AND_PROBLEMS if len(pa) > 1 else OVER_PROBLEMS
    diffs = []
    for a, b in zip(arm_runs, ref_runs):
        va, vb = _run_value(a, metric), _run_value(b, metric)
        if va is not None and vb is not None and not math.isnan(va - vb):
            diffs.append(va - vb)
    if not diffs:
        return None, NO_DATA
    return (np.array([diffs]).T,
            OVER_SEEDS_NO_PROBLEMS if len(diffs) > 1 else NO_INTERVAL_NO_PROBLEMS)


def paired_row(arm: Arm, ref: Arm, notes: list[str]) -> PairedRow:
    mine, theirs = _by_seed(arm, notes), _by_seed(ref, notes)
    seeds = [s for s in mine if s in theirs]
    a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
    greedy = estimate(*paired_difference(a, b, "greedy"), with_share=True)
    passk = estimate(*paired_difference(a, b, "pass"), with_share=True)
    if not seeds:
        notes.append(f"{arm.label}: no seed in common with {ref.label}; no paired comparison")
    return PairedRow(
        arm=arm.label, reference=ref.label, seeds=len(seeds), seed_list=_seed_text(seeds),
        problems=greedy.problems, interval=greedy.kind,
        greedy_diff=greedy.mean, greedy_diff_lo=greedy.lo, greedy_diff_hi=greedy.hi,
        greedy_share_below_0=greedy.share_below_0,
        pass_at_k_diff=passk.mean, pass_at_k_diff_lo=passk.lo, pass_at_k_diff_hi=passk.hi,
        pass_at_k_share_below_0=passk.share_below_0)


def paired_table(arms: Sequence[Arm], notes: list[str] | None = None) -> list[PairedRow]:
    """Every non-uniform arm against its uniform reference (empty without a uniform arm)."""
    notes = [] if notes is None else notes
    rows = []
    for arm in arms:
        ref = reference_arm(arm, arms) if arm.method != "uniform" else None
        if ref is not None:
            rows.append(paired_row(arm, ref, notes))
    return rows


# --- Markdown --------------------------------------------------------------------------------


def _ci(mean: float | None, lo: float | None, hi: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else f"{_fmt(mean)} [n/a]"


def intervals_markdown(rows: Sequence[IntervalRow]) -> str:
    ks = {r.k for r in rows} - {None}
    pass_name = f"pass@{ks.pop()}" if len(ks) == 1 else "pass@k"
    body = [[r.arm, r.seeds, _ci(r.greedy_mean, r.greedy_lo, r.greedy_hi),
             _ci(r.pass_at_k_mean, r.pass_at_k_lo, r.pass_at_k_hi),
             r.accuracy_interval + (f", {r.problems} problems" if r.problems else ""),
             _ci(r.train_reward_mean, r.train_reward_lo, r.train_reward_hi),
             _ci(r.gini_mean, r.gini_lo, r.gini_hi),
             _ci(r.effective_token_ratio_mean, r.effective_token_ratio_lo,
                 r.effective_token_ratio_hi)] for r in rows]
    return markdown_table(["arm", "seeds", "greedy [95% CI]", f"{pass_name} [95% CI]",
                           "accuracy CI over", "train reward [95% CI]", "Gini [95% CI]",
                           "EffN/T [95% CI]"], body)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def paired_markdown(rows: Sequence[PairedRow]) -> str:
    body = [[r.arm, r.reference, r.seeds, r.problems if r.problems else "—", r.interval,
             _ci(r.greedy_diff, r.greedy_diff_lo, r.greedy_diff_hi),
             _share(r.greedy_share_below_0),
             _ci(r.pass_at_k_diff, r.pass_at_k_diff_lo, r.pass_at_k_diff_hi),
             _share(r.pass_at_k_share_below_0)] for r in rows]
    return markdown_table(["arm", "vs", "seeds", "problems", "CI over",
                           "Δ greedy [95% CI]", "share of resamples Δ greedy < 0",
                           "Δ pass@k [95% CI]", "share of resamples Δ pass@k < 0"], body)


def interval_notes(arms: Sequence[Arm], rows: Sequence[IntervalRow]) -> list[str]:
    """What the reader should know about the intervals: missing per-problem results, one seed,
    unfinished runs inside an arm."""
    notes = []
    for arm, row in zip(arms, rows):
        if row.accuracy_interval in (OVER_SEEDS_NO_PROBLEMS, NO_INTERVAL_NO_PROBLEMS):
            notes.append(f"{arm.label}: eval.jsonl has no per-problem results (greedy, "
                         f"correct_of_k; logs from before the trainer wrote them), so the "
                         f"accuracy interval is not over problems"
                         + (" and there is none (one seed)" if row.seeds == 1 else
                            " (over seeds only)"))
        if 1 < row.seeds and not row.finished:
            unfinished = [r.name for r in arm.runs if not r.finished]
            notes.append(f"{arm.label}: {', '.join(unfinished)} unfinished; the arm's means "
                         f"include their latest values")
    return notes
