"""The `arca-jax` command (also `python -m arca_jax`).

    arca-jax train [--config FILE] [--set key=value]... [--output-dir DIR] [--resume]
                   [--coordinator-address HOST:PORT --num-processes N --process-id I] ...
    arca-jax eval --run DIR [--checkpoint STEP]
    arca-jax export --run DIR --peft OUT [--checkpoint STEP]
    arca-jax sweep CONFIG... [--root DIR] [--set key=value]... [--seeds S1,S2,...]
    arca-jax report RUN_DIR... --out DIR
    arca-jax plan [--config FILE] [--set key=value]... [--topology v5e:4x4] [--mesh D,F,T] [--json]

Bad input (a config, a path, a run directory, a damaged checkpoint) ends with a one-line
message and exit code 2; a checkpoint or a log that cannot be written (a full disk) with one
line and exit code 5 (the latest complete checkpoint stays loadable: continue with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from arca_jax import rundir

EXIT_USAGE = 2
EXIT_SAVE_FAILED = 5


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: exit 2 with the usage line, as usual
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_train(sub):
    p = sub.add_parser("train", help="run GRPO training (no --config: the embedded tiny demo)",
                       description="Train a LoRA adapter with GRPO and token-level credit "
                                   "assignment. Without --config it trains the tiny arithmetic "
                                   "model shipped with the package, on the CPU in minutes.")
    p.add_argument("--config", help="YAML config file (sections model, lora, task, rollout, grpo, "
                                    "optim, train); omitted keys keep their defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set grpo.weighting=uniform (repeatable)")
    p.add_argument("--output-dir", help="run directory (default: runs/<method>-r<rank>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its latest checkpoint")
    g = p.add_argument_group(
        "multi-host runs", "Run the same command on every host (train.mode=mesh). Settings come "
        "from these flags, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, "
        "else torchrun's MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK, else SLURM or Open MPI, "
        "else a Cloud TPU pod slice's metadata; none of these: one process.")
    g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto: start JAX's distributed runtime when the settings above say there "
                        "are several processes (or on a multi-host Cloud TPU slice); on: "
                        "require it; off: never")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="process 0's host and a free port, the same on every process")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    g.add_argument("--local-device-ids", metavar="IDS",
                   help="comma-separated local accelerators this process uses (default: all)")
    g.add_argument("--init-timeout", type=int, metavar="S",
                   help="seconds to wait for the coordinator and all processes (default 300)")
    g.add_argument("--heartbeat-timeout", type=int, metavar="S",
                   help="a process silent this long counts as dead and the others exit "
                        "(default 100)")
    g.add_argument("--watchdog", type=float, metavar="S", default=None,
                   help="exit (code 4) when no training phase completes for S seconds, e.g. a "
                        "host stuck while the others wait; include compile time (default: off)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a run's adapter on the held-out problems")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")


def _add_export(sub):
    p = sub.add_parser("export", help="write a run's adapter as a PEFT adapter directory")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--peft", required=True, help="output directory for the PEFT adapter")
    p.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")


def _seed_list(text: str) -> List[int]:
    """'1337,1338,1339' -> [1337, 1338, 1339] (argparse type of --seeds)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not seeds:
        raise argparse.ArgumentTypeError("no seed given")
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="run several configs (and seeds) one after another",
                       description="Runs each config into ROOT/<config file stem>, or with "
                                   "--seeds into ROOT/<config file stem>-seed<seed> once per seed; "
                                   "finished runs (summary.json) are skipped, interrupted ones "
                                   "resumed.")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config files")
    p.add_argument("--root", default="runs", help="parent directory of the run directories")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every config (repeatable)")
    p.add_argument("--seeds", type=_seed_list, metavar="S1,S2,...",
                   help="run every config once per seed (train.seed set after the config and "
                        "--set), e.g. --seeds 1337,1338,1339; `arca-jax report` then gives means "
                        "over seeds with intervals")


def _add_report(sub):
    from arca_jax import report

    p = sub.add_parser("report", help="tables, plots and a credit heatmap from run directories")
    report.add_arguments(p)


def _add_plan(sub):
    p = sub.add_parser(
        "plan", help="compile a run's programs for a TPU slice or the local devices: memory, "
                     "flops, collectives, roofline time, whether it fits",
        description="Builds the run's train step and sampler programs from the config with "
                    "abstract arrays (no weights are loaded; model.path may be a released "
                    "model's name, e.g. Qwen/Qwen3-8B-Base), compiles them for the target and "
                    "reports per-device memory against HBM, flops and bytes (every loop body "
                    "times its trip count), collectives, a roofline time and a verdict; when it "
                    "does not fit, the smallest change that does (fsdp, a rollout tensor axis, "
                    "tensor, remat, microbatches). TPU topologies need libtpu: "
                    "pip install 'arca-jax[tpu]'.")
    p.add_argument("--config", help="the run's YAML config (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--topology", metavar="GEN:AxB[xC]",
                   help="a TPU slice to compile for, e.g. v5e:4x4 (16 chips), v5p:2x2x2, v6e:2x4 "
                        "(default: the local devices)")
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                   help="mesh axis sizes (default: the config's train.mesh_* when train.mode is "
                        "mesh, else every device on fsdp)")
    p.add_argument("--hbm", type=float, metavar="GIB",
                   help="memory per chip in GiB instead of the chip's published figure")
    p.add_argument("--libtpu", metavar="DIR",
                   help="a directory holding the libtpu package (pip install --target DIR "
                        "libtpu), added to the import path for this command only; default "
                        "$ARCA_JAX_LIBTPU_DIR, else an installed libtpu")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="report the given setting only, without trying changes that fit")
    p.add_argument("--max-tries", type=int, default=6, metavar="N",
                   help="at most N recompiled settings when looking for one that fits "
                        "(default 6)")
    p.add_argument("--eval", dest="evaluation", action="store_true",
                   help="also compile the evaluation's pass@k sampling (eval_batch_size x pass_k "
                        "rows; runs every train.eval_every steps)")
    p.add_argument("--hlo-dir", metavar="DIR",
                   help="write each compiled program's HLO text to DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="arca-jax", description="ARCA: adapter-residual credit assignment for "
                                                  "LoRA RL, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_sweep(sub)
    _add_report(sub)
    _add_plan(sub)
    return parser


def cmd_train(args) -> int:
    from arca_jax import config, distributed, train

    cfg = config.load(args.config, args.overrides)
    run_dir = args.output_dir or os.path.join(
        "runs", f"{cfg.grpo.weighting}-r{cfg.lora.rank}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and not args.output_dir:
        raise config.ConfigError("--resume needs --output-dir (the run directory to continue)")
    settings = distributed.settings_from_args(
        getattr(args, "distributed", "auto"), getattr(args, "coordinator_address", None),
        getattr(args, "num_processes", None), getattr(args, "process_id", None),
        getattr(args, "local_device_ids", None), getattr(args, "init_timeout", None),
        getattr(args, "heartbeat_timeout", None))
    if distributed.resolve(settings).active and not args.output_dir:
        raise config.ConfigError("a multi-process run needs --output-dir (the same shared "
                                 "directory on every host)")
    distributed.initialize(settings)
    summary = train.train(cfg, run_dir, resume=args.resume,
                          watchdog_s=getattr(args, "watchdog", None))
    import jax
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
    return 0 if summary.get("finished") else 3


def cmd_eval(args) -> int:
    import dataclasses

    from arca_jax import trainer

    cfg, model, adapter, step = trainer.load_run(args.run, args.checkpoint)
    task, problems = trainer.load_eval_task(cfg)
    res = trainer.evaluate(model, adapter, cfg.lora.scaling, problems,
                           trainer.Scorer(task, cfg.task.reward_timeout_s), cfg, step,
                           trainer.stream_key(cfg, trainer.Stream.EVAL, step))
    print(json.dumps({"checkpoint": step, **dataclasses.asdict(res)}, indent=2))
    return 0


def cmd_export(args) -> int:
    from arca_jax import lora, trainer

    cfg, model, adapter, step = trainer.load_run(args.run, args.checkpoint)
    base = cfg.model.path if not cfg.model.path.startswith("embedded:") else cfg.model.resolved_path()
    lora.save_peft(args.peft, trainer.lora_config(cfg, model.config), adapter,
                   base_model_name_or_path=base, config=model.config)
    print(f"wrote the adapter of step {step} to {args.peft} (PEFT format)")
    return 0


def sweep_jobs(configs, seeds=None):
    """[(config path, seed or None, run directory name)]: config by config, and within a config
    seed by seed; the name is the config file's stem, with --seeds `<stem>-seed<seed>`."""
    jobs = []
    for path in configs:
        stem = os.path.splitext(os.path.basename(path))[0]
        for seed in (seeds or [None]):
            jobs.append((path, seed, stem if seed is None else f"{stem}-seed{seed}"))
    return jobs


def sweep_overrides(overrides, seed=None) -> List[str]:
    """The overrides of one sweep run: --set's, then train.seed=<seed> when the sweep has seeds."""
    return list(overrides) + ([] if seed is None else [f"train.seed={seed}"])


def sweep_plan(configs, root: str, seeds=None):
    """[(config path, run dir, action)] in `sweep_jobs` order, with action "skip" (finished),
    "resume" (has checkpoints) or "start"."""
    plan = []
    for path, _, name in sweep_jobs(configs, seeds):
        run_dir = os.path.join(root, name)
        summary = rundir.path(run_dir, rundir.SUMMARY)
        action = "start"
        if os.path.isfile(summary):
            try:
                with open(summary) as f:
                    action = "skip" if json.load(f).get("finished") else "resume"
            except (OSError, ValueError):
                action = "resume"
        elif (os.path.isdir(rundir.path(run_dir, rundir.CHECKPOINTS))
              or os.path.isfile(rundir.path(run_dir, rundir.CONFIG))):
            action = "resume"  # an interrupted run (resume restarts it when it has no checkpoint)
        plan.append((path, run_dir, action))
    return plan


def cmd_sweep(args) -> int:
    from arca_jax import config, train

    seeds = getattr(args, "seeds", None)
    if seeds and any(o.split("=", 1)[0].strip() == "train.seed" for o in args.overrides):
        raise config.ConfigError("--seeds sets train.seed for each run; drop --set train.seed")
    jobs = sweep_jobs(args.configs, seeds)
    cfgs = [config.load(path, sweep_overrides(args.overrides, seed))  # validate all first
            for path, seed, _ in jobs]
    plan = sweep_plan(args.configs, args.root, seeds)
    names = [run_dir for _, run_dir, _ in plan]
    if len(set(names)) != len(names):
        raise config.ConfigError("two configs share a file name; their run directories would clash")
    status = 0
    for cfg, (path, run_dir, action) in zip(cfgs, plan):
        print(f"sweep: {path} -> {run_dir}: {action}", file=sys.stderr)
        if action == "skip":
            continue
        summary = train.train(cfg, run_dir, resume=action == "resume")
        if not summary.get("finished"):
            return 3  # preempted: stop the sweep; rerun it to continue
    return status


def cmd_report(args) -> int:
    from arca_jax import report

    return report.run(args)


def cmd_plan(args) -> int:
    from arca_jax import config, plan

    cfg = config.load(args.config, args.overrides)
    if args.hbm is not None and not args.hbm > 0:
        raise config.ConfigError(f"--hbm must be a positive number of GiB, got {args.hbm}")
    if args.topology:
        plan.parse_topology(args.topology)  # its one-line error before libtpu is looked for
        target = plan.tpu_target(args.topology, args.hbm, args.libtpu)
    else:
        target = plan.local_target(args.hbm)
    layout = plan.Layout.parse(args.mesh, target.size) if args.mesh else None
    log = (lambda text: print(f"plan: {text}", file=sys.stderr)) if args.json else print
    if args.max_tries < 1:
        raise config.ConfigError(f"--max-tries must be >= 1, got {args.max_tries}")
    verdict = plan.run(cfg, target, layout, search=args.search, max_tries=args.max_tries,
                       log=log, evaluation=args.evaluation, hlo_dir=args.hlo_dir)
    if args.json:
        print(json.dumps(plan.to_json(verdict), indent=2))
    else:
        print(plan.format_text(verdict))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "sweep": cmd_sweep,
            "report": cmd_report, "plan": cmd_plan}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from arca_jax.errors import ConfigError

    try:
        if args.command in ("train", "eval", "sweep"):
            from arca_jax import host_memory
            host_memory.reuse_freed_memory()  # before JAX starts (off: ARCA_JAX_REUSE_HOST_MEMORY=0)
            from arca_jax import replicas
            replicas.use_cpu_cores()  # before JAX starts: two CPU devices per core (samplers)
            from arca_jax.trainer import setup
            setup.use_compilation_cache()  # before anything compiles (off: ARCA_JAX_COMPILATION_CACHE=0)
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"arca-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        _exit_now_if_multiprocess(EXIT_USAGE)
        return EXIT_USAGE
    except BaseException as e:
        ckpt = sys.modules.get("arca_jax.checkpoint")  # imported by any command that saves
        runlog = sys.modules.get("arca_jax.runlog")  # imported by any command that logs
        if (ckpt is not None and isinstance(e, ckpt.CheckpointSaveError)) or (
                runlog is not None and isinstance(e, runlog.LogWriteError)):
            print(f"arca-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
            _exit_now_if_multiprocess(EXIT_SAVE_FAILED)
            return EXIT_SAVE_FAILED
        if _multiprocess():
            import traceback
            traceback.print_exc()
            _exit_now_if_multiprocess(1)
        raise


def _multiprocess() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax
    return jax.distributed.is_initialized() and jax.process_count() > 1


def _exit_now_if_multiprocess(code: int) -> None:
    """With several processes, an error on one of them must not wait for the others at JAX's
    shutdown barrier (up to 5 minutes while they wait in a collective): exit at once; the others
    are then ended by the distributed runtime within its heartbeat timeout."""
    if _multiprocess():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
