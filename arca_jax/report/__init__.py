"""Reports on training runs (finished or not): the paper's two tables, curves, a credit heatmap.

``arca-jax report RUN_DIR... --out DIR`` reads run directories written by the trainer and writes::

    DIR/report.md             the tables inline, links to everything below, notes on the inputs
    DIR/performance.md/.csv   method, rank, trainable params, greedy accuracy, pass@k, train reward
    DIR/diagnostics.md/.csv   method, rank, Gini, EffN/T (averaged over training steps)
    DIR/comparison.md         our numbers beside the paper's published ones, with both settings
    DIR/intervals.csv         per arm (runs differing only in train.seed): means over seeds with
                              95% bootstrap intervals (also report.md's "Seeds and intervals")
    DIR/paired.csv            each arm minus uniform, paired by seed and problem, with intervals
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
                   num_problems, greedy (per problem: the greedy completion's reward) and
                   correct_of_k (per problem: correct samples of k); older logs lack the last two
                   (then no interval is over problems; report.md says so)
    samples.jsonl  step, prompt, completion, reward, tokens (token strings of the completion),
                   weights {mode: [float per token]} for all five modes on that same completion
                   (and the run's grpo.weighting when it is a user's: any other key is a row)
    summary.json   written at the end: method, rank, trainable_params, base_greedy_accuracy,
                   base_pass_at_k, final_greedy_accuracy, final_pass_at_k, k, mean_train_reward,
                   mean_weight_gini, mean_effective_token_ratio, steps, wall_time_s, finished

Decisions (each also stated where it applies):

- Errors: a missing or unparsable ``config.yaml`` or ``metrics.jsonl``, a config without a
  ``grpo.weighting`` (the paper's five or a user's name) or a positive ``lora.rank``, a corrupt line that is not the last line of any
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
- Seeds: runs whose config.yaml agree in everything but ``train.seed`` form one *arm* (``arms``).
  The Markdown tables (report.md, performance.md, diagnostics.md, comparison.md) have one row per
  arm, the mean over its seeds where it has several; performance.csv and diagnostics.csv keep one
  row per run. Intervals and paired comparisons: see ``intervals``.
- Table order is the paper's: uniform, surprisal, entropy reduction, divergence, ARCA, then any
  other weighting (a user's, by its configured name); by rank within a method, then by run name.
- Objectives: a run whose config departs from the paper's GRPO in a named way is labelled so
  everywhere (tables' method column, arm labels in plots and intervals, the heatmap's caption):
  ``uniform [GSPO]`` (grpo.ratio_level sequence), ``[CISPO]`` (grpo.policy_loss),
  ``uniform [DAPO]`` (rollout.dynamic_sampling),
  ``[TIS]`` / ``[MIS]`` (grpo.behaviour_correction), ``[dual-clip 3]`` (grpo.clip_ratio_max),
  ``[entropy top 0.2]`` (grpo.top_entropy_quantile), ``ARCA [layers=all]`` / ``[relative]``
  (grpo.arca_layers, arca_relative; also the heatmap's "arca" row of such a run, whose weights
  were measured that way). Other setting differences show as before, in the run cell.
- Heatmap shading is per method row: weight / the row's largest weight, so each row shows where
  *that* method puts its credit; the row label gives the completion's Gini and EffN/T for scale.
- Plots use matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), never pyplot, so
  importing or running the report changes no global matplotlib state (notebooks keep their
  backend). matplotlib is imported only when a plot is drawn.
- This package does not import JAX (nor any arca_jax module outside it); it only reads files.

Modules (everything public is re-exported here, so ``arca_jax.report.X`` works for all of them)::

    records   the modes, the run-directory file names, Run and its parts, sort_runs
    load      reading run directories (load_run, load_runs; the JSON-lines readers)
    paper     the paper's published setting and numbers
    tables    the performance and diagnostics tables: rows, Markdown, CSV, consistency notes
    compare   our tables beside the paper's (comparison.md)
    arms      grouping runs into arms (all but the seed equal), arm labels, per-arm table rows
    intervals means over seeds with bootstrap intervals; paired differences from uniform
    figure    matplotlib figures without pyplot; ReportError
    plots     reward/accuracy and weight-diagnostic curves
    heatmap   the credit heatmap (PNG and HTML), gini and effective_token_ratio
    write     write_report: the whole report into one directory
    cli       add_arguments, run, main (``arca-jax report``, ``python -m arca_jax.report``)
"""

from __future__ import annotations

from arca_jax.report.arms import (Arm, arm_diagnostics_table, arm_key, arm_performance_table,
                                  arm_settings, group_arms)
from arca_jax.report.cli import add_arguments, main, run
from arca_jax.report.compare import comparison_markdown
from arca_jax.report.figure import ReportError
from arca_jax.report.heatmap import (HeatmapChoice, HeatmapRow, choose_sample, display_token,
                                     effective_token_ratio, gini, heatmap_rows, plot_heatmap,
                                     render_heatmap_html, row_label, write_heatmap_html)
from arca_jax.report.intervals import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, IntervalRow,
                                       PairedRow, bootstrap_means, interval_table,
                                       intervals_markdown, paired_markdown, paired_table,
                                       percentile_interval, reference_arm)
from arca_jax.report.load import (load_config, load_evals, load_metrics, load_run, load_runs,
                                  load_samples, load_summary)
from arca_jax.report.paper import (PAPER_DIAGNOSTICS, PAPER_PERFORMANCE, PAPER_SETTING,
                                   PaperDiagnostics, PaperPerformance, PaperSetting)
from arca_jax.report.plots import plot_reward_accuracy, plot_weight_diagnostics, trailing_mean
from arca_jax.report.records import (CONFIG_FILE, EVAL_FILE, METHOD_LABELS, METRICS_FILE, MODES,
                                     SAMPLES_FILE, SUMMARY_FILE, EvalPoint, Metrics, Run, Sample,
                                     Summary, arm_label, config_get, method_cell, objective_tags,
                                     sort_runs)
from arca_jax.report.tables import (DiagnosticsRow, PerformanceRow, consistency_notes,
                                    diagnostics_markdown, diagnostics_row, diagnostics_table,
                                    format_params, markdown_table, performance_markdown,
                                    performance_row, performance_table, write_csv)
from arca_jax.report.write import ReportPaths, write_report

__all__ = [
    "Arm", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "IntervalRow", "PairedRow",
    "arm_diagnostics_table", "arm_key", "arm_performance_table", "arm_settings",
    "bootstrap_means", "group_arms", "interval_table", "intervals_markdown", "paired_markdown",
    "paired_table", "percentile_interval", "reference_arm",
    "CONFIG_FILE", "DiagnosticsRow", "EVAL_FILE", "EvalPoint", "HeatmapChoice", "HeatmapRow",
    "METHOD_LABELS", "METRICS_FILE", "MODES", "Metrics", "PAPER_DIAGNOSTICS", "PAPER_PERFORMANCE",
    "PAPER_SETTING", "PaperDiagnostics", "PaperPerformance", "PaperSetting", "PerformanceRow",
    "ReportError", "ReportPaths", "Run", "SAMPLES_FILE", "SUMMARY_FILE", "Sample", "Summary",
    "add_arguments", "arm_label", "choose_sample", "comparison_markdown", "config_get",
    "consistency_notes", "diagnostics_markdown", "diagnostics_row", "diagnostics_table",
    "display_token", "effective_token_ratio", "format_params", "gini", "heatmap_rows",
    "load_config", "load_evals", "load_metrics", "load_run", "load_runs", "load_samples",
    "load_summary", "main", "markdown_table", "performance_markdown", "performance_row",
    "performance_table", "plot_heatmap", "plot_reward_accuracy", "plot_weight_diagnostics",
    "render_heatmap_html", "run", "sort_runs", "trailing_mean", "write_csv", "write_heatmap_html",
    "write_report",
    # objectives (GSPO, DAPO, importance corrections) and ARCA's measurement in labels
    "method_cell", "objective_tags", "row_label",
]
