"""The paper's seven runs and the tiny sweep are valid configs with the paper's settings."""

import glob
import os

import pytest

from arca_jax import config
from fixtures import REPO

ROOT = os.path.join(REPO, "experiments", "configs")
ARMS = {("uniform", 64), ("surprisal", 64), ("entropy_reduction", 64), ("divergence", 64),
        ("arca", 4), ("arca", 16), ("arca", 64)}


@pytest.mark.parametrize("kind", ["paper", "tiny"])
def test_seven_arms(kind):
    files = sorted(glob.glob(os.path.join(ROOT, kind, "*.yaml")))
    cfgs = [config.load(f) for f in files]
    assert {(c.grpo.weighting, c.lora.rank) for c in cfgs} == ARMS and len(cfgs) == 7
    for c in cfgs:
        assert c.lora.alpha == 2 * c.lora.rank and c.grpo.sharpening == 2.0
        assert c.train.seed == 1337 and c.grpo.estimator == "grpo"
        assert len({x.optim.learning_rate for x in cfgs}) == 1  # one rate for every arm


def test_paper_settings():
    for f in glob.glob(os.path.join(ROOT, "paper", "*.yaml")):
        c = config.load(f)
        assert c.model.path == "Qwen/Qwen3-1.7B-Base" and c.task.name == "math"
        assert c.lora.dropout == 0.05 and len(c.lora.targets) == 7
        assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.warmup_steps,
                c.optim.max_grad_norm) == (5e-6, 0.0, 10, 1.0)
        assert (c.rollout.prompts_per_step, c.rollout.group_size, c.train.microbatches) == (8, 4, 4)
        assert (c.rollout.max_prompt_tokens, c.rollout.max_new_tokens) == (512, 512)
        assert (c.rollout.temperature, c.rollout.top_p) == (1.0, 0.95)
        assert (c.train.steps, c.train.save_every, c.train.pass_k) == (100, 20, 4)
        assert c.task.num_eval_problems == 200
        # the authors' prompt, reward and prompt truncation (tests/test_paper_fidelity_tasks.py)
        assert (c.task.prompt_style, c.task.reward_mode, c.rollout.prompt_truncation) == (
            "reference", "reference", "right")
        # EOS outside the loss (Qwen3-Base pads with EOS) and bfloat16 logits, as the authors' code
        assert (c.rollout.eos_token, c.grpo.logits_dtype) == ("mask_if_pad", "bfloat16")
        assert c.rollout.top_k == 50  # transformers generate's default, as the authors sampled


# --------------------------------------------------------------------------------------------
# The objectives' tiny arms (experiments/configs/tiny_objectives/)
# --------------------------------------------------------------------------------------------

OBJECTIVES = ROOT + "/tiny_objectives"
# arm -> (its tiny counterpart, the settings it changes)
OBJECTIVE_ARMS = {
    "gspo_uniform_r64": ("uniform_r64", {
        "grpo.ratio_level": "sequence", "grpo.clip_eps": 3e-4, "grpo.clip_eps_high": 4e-4,
        "grpo.num_iterations": 2}),
    "dapo_uniform_r64": ("uniform_r64", {  # clip_eps 0.2, 4 extra rounds, penalty 1: defaults
        "grpo.clip_eps_high": 0.28, "grpo.loss_aggregation": "token_mean",
        "grpo.num_iterations": 2, "rollout.dynamic_sampling": True,
        "rollout.overlong_buffer": 16}),
    "arca_r64_layers_all": ("arca_r64", {"grpo.arca_layers": "all"}),
    "arca_r64_relative": ("arca_r64", {"grpo.arca_relative": True}),
    "entropy_top20_uniform_r64": ("uniform_r64", {"grpo.top_entropy_quantile": 0.2}),
    "cispo_uniform_r64": ("uniform_r64", {  # cispo_cap 5: the default
        "grpo.policy_loss": "cispo", "grpo.loss_aggregation": "token_mean",
        "grpo.num_iterations": 2}),
}
LABELS = {"gspo_uniform_r64": "uniform r64 [GSPO]", "dapo_uniform_r64": "uniform r64 [DAPO]",
          "arca_r64_layers_all": "ARCA r64 [layers=all]",
          "arca_r64_relative": "ARCA r64 [relative]",
          "entropy_top20_uniform_r64": "uniform r64 [entropy top 0.2]",
          "cispo_uniform_r64": "uniform r64 [CISPO]"}


def _flat(cfg) -> dict:
    from arca_jax import configlib
    from arca_jax.report.arms import flatten_config
    return flatten_config(configlib.to_dict(cfg))


def test_objective_arms_change_only_their_settings():
    files = sorted(glob.glob(os.path.join(OBJECTIVES, "*.yaml")))
    assert [os.path.basename(f)[:-5] for f in files] == sorted(OBJECTIVE_ARMS)
    for f in files:
        counterpart, changes = OBJECTIVE_ARMS[os.path.basename(f)[:-5]]
        arm = _flat(config.load(f))
        base = _flat(config.load(os.path.join(ROOT, "tiny", counterpart + ".yaml")))
        differ = {k: arm[k] for k in arm if arm[k] != base[k]}
        assert differ == changes, (f, differ)


# steps, batch and lengths cut down: one step of each arm, with samples and evaluations
SHORT = ["train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=4",
         "rollout.max_new_tokens=48", "task.num_eval_problems=2", "task.max_train_samples=32",
         "train.samples_every=1", "train.samples_per_log=1", "train.eval_batch_size=2"]


@pytest.fixture(scope="module")
def objective_runs(tmp_path_factory):
    from arca_jax import train
    root = tmp_path_factory.mktemp("objectives")
    dirs = {}
    for name in sorted(OBJECTIVE_ARMS):
        dirs[name] = root / name
        summary = train.train(config.load(os.path.join(OBJECTIVES, name + ".yaml"), SHORT),
                              str(dirs[name]))
        assert summary["finished"], name
    return dirs


@pytest.mark.slow
def test_objective_arms_train_log_and_report(objective_runs, tmp_path):
    from arca_jax import report
    from fixtures import read_jsonl
    rows = {n: read_jsonl(os.path.join(d, "metrics.jsonl")) for n, d in objective_runs.items()}
    dapo = rows["dapo_uniform_r64"][0]
    for key in ("groups_dropped", "resample_rounds", "groups_zero_kept", "batch_reward_mean",
                "overlong_penalised", "overlong_penalty_mean"):
        assert key in dapo, key
    assert dapo["resample_rounds"] <= 4 and dapo["overlong_penalty_mean"] <= 0
    assert "truncated_masked" not in dapo  # overlong filtering is off in DAPO's recipe
    layers = rows["arca_r64_layers_all"][0]["residual_norm_layers"]
    assert len(layers) == 3 and abs(sum(layers) / 3 - rows["arca_r64_layers_all"][0][
        "residual_norm_mean"]) <= 1e-5 * max(1.0, abs(rows["arca_r64_layers_all"][0][
            "residual_norm_mean"]))
    for name in ("gspo_uniform_r64", "arca_r64_relative"):
        assert "residual_norm_layers" not in rows[name][0] and "groups_dropped" not in rows[name][0]
    for r in rows.values():  # aux_loss, expert_load: MoE models only (absent for a dense model)
        assert all(v is not None for k, v in r[0].items() if not k.startswith("residual")), r[0]
        assert "aux_loss" not in r[0] and "expert_load" not in r[0]
    runs = report.load_runs(list(objective_runs.values()))
    assert {r.name: r.label for r in runs} == LABELS
    paths = report.write_report(list(objective_runs.values()), tmp_path / "report",
                                heatmap_run="arca_r64_layers_all")
    text = paths.report_md.read_text()
    for label in ("uniform [GSPO]", "uniform [DAPO]", "ARCA [layers=all]", "ARCA [relative]",
                  "uniform [entropy top 0.2]", "uniform [CISPO]"):
        assert f"| {label} | 64 |" in text, label
    assert "ARCA [layers=all]:" in paths.heatmap_html.read_text()
