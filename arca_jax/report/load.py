"""Reading run directories into ``Run`` records (which inputs are errors and which are notes: see
the package docstring).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from arca_jax.report.records import (CONFIG_FILE, EVAL_FILE, METRICS_FILE, MODES, SAMPLES_FILE,
                                     SUMMARY_FILE, EvalPoint, Metrics, Run, Sample, Summary,
                                     _is_int, _opt_str, config_get)


_METRIC_NUMBER_KEYS = (
    "reward_mean", "reward_std", "loss", "grad_norm", "learning_rate", "weight_gini",
    "effective_token_ratio", "residual_norm_mean", "residual_norm_max", "kl", "completion_length",
    "time_sample_s", "time_score_s", "time_update_s", "tokens_per_s",
)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    """Reads config.yaml; checks for a grpo.weighting (the paper's five or any other weighting's
    name, e.g. a user's "module:attribute") and a positive lora.rank."""
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
    if not isinstance(method, str) or not method:
        raise ValueError(f"{path}: grpo.weighting is {method!r}, expected a weighting's name "
                         f"(one of {list(MODES)} or a user's)")
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
        # deliberate: one typed read per field, as load_summary does for its own fields
        point = EvalPoint(
            step=_field_int(rec, "step", where, required=True),
            greedy_accuracy=_field_number(rec, "greedy_accuracy", where),
            pass_at_k=_field_number(rec, "pass_at_k", where),
            k=_field_int(rec, "k", where),
            num_problems=_field_int(rec, "num_problems", where),
            greedy=_field_number_list(rec, "greedy", where),
            correct_of_k=_field_count_list(rec, "correct_of_k", where),
        )
        _check_per_problem(point, where, notes)
        items.append((point.step, point))
    return tuple(_dedupe_by_step(items, path, notes))


def _field_number_list(rec: Mapping[str, Any], key: str, where: str
                       ) -> tuple[float, ...] | None:
    """rec[key] as a tuple of floats; None when absent or null (logs older than the field)."""
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(_is_number(x) for x in v):
        raise ValueError(f"{where}: {key} must be a list of numbers")
    return tuple(float(x) for x in v)


def _field_count_list(rec: Mapping[str, Any], key: str, where: str) -> tuple[int, ...] | None:
    """rec[key] as a tuple of non-negative ints; None when absent or null."""
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(
            _is_number(x) and float(x).is_integer() and x >= 0 for x in v):
        raise ValueError(f"{where}: {key} must be a list of non-negative integers")
    return tuple(int(x) for x in v)


def _check_per_problem(p: EvalPoint, where: str, notes: list[str]) -> None:
    """Per-problem lists must match num_problems and k (ValueError); a mean that disagrees with
    the logged accuracy is a note."""
    for key, values in (("greedy", p.greedy), ("correct_of_k", p.correct_of_k)):
        if values is not None and p.num_problems is not None and len(values) != p.num_problems:
            raise ValueError(f"{where}: {key} has {len(values)} values for num_problems = "
                             f"{p.num_problems}")
    if p.greedy is not None and p.correct_of_k is not None and \
            len(p.greedy) != len(p.correct_of_k):
        raise ValueError(f"{where}: greedy has {len(p.greedy)} values, correct_of_k "
                         f"{len(p.correct_of_k)}")
    if p.correct_of_k is not None and p.k is not None and any(c > p.k for c in p.correct_of_k):
        raise ValueError(f"{where}: correct_of_k has a count above k = {p.k}")
    for key, values, logged in (("greedy", p.greedy, p.greedy_accuracy),
                                ("correct_of_k", p.per_problem_pass, p.pass_at_k)):
        if values and logged is not None and not math.isclose(
                sum(values) / len(values), logged, rel_tol=1e-6, abs_tol=1e-6):
            notes.append(f"{where}: the per-problem {key} give {sum(values) / len(values):.6g}, "
                         f"the logged accuracy is {logged:.6g}")


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
    """Loads one run directory (see ``arca_jax.report`` for what is an error and what a note)."""
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
