"""`arca-jax train` on a tiny Qwen3 mixture-of-experts checkpoint (random, saved with
transformers, the embedded tokenizer): the run end to end, its routing metrics, and the LoRA
targets an MoE model takes."""

import math
import os
import shutil

import numpy as np
import pytest

from arca_jax import cli, config, lora, qwen3, train, trainer
from arca_jax.config import ASSETS, ConfigError
from fixtures import random_hf_model, read_jsonl, tiny_moe_hf_config

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RUN = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2",
       "rollout.max_new_tokens=8", "task.num_eval_problems=0", "task.max_train_samples=16",
       "train.save_every=0", "train.samples_every=0", "grpo.weighting=arca",
       "grpo.router_aux_loss_coef=0.01", "optim.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A random tiny MoE checkpoint (3 layers, layer 1 dense; 4 experts, top-2) with the
    tiny-arith tokenizer (vocabulary 99, EOS 1, pad 0)."""
    cfg = tiny_moe_hf_config(experts=4, top_k=2, layers=3, mlp_only=(1,), vocab=99, tied=True)
    cfg.eos_token_id, cfg.pad_token_id = 1, 0
    path = tmp_path_factory.mktemp("tiny-moe")
    random_hf_model(cfg, seed=3).save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER:
        shutil.copy(os.path.join(ASSETS, "tiny-arith", name), path)
    return str(path)


EXPERT_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "gate")


def test_train_run_logs_routing(moe_dir, tmp_path):
    """A run with adapters on attention, the experts and the router: routing logged, the
    adapter checkpointed and exported."""
    run_dir = str(tmp_path / "run")
    targets = f"lora.targets=[{','.join(EXPERT_TARGETS)}]"
    summary = train.train(config.load(None, RUN + [f"model.path={moe_dir}", targets]), run_dir)
    assert summary["finished"] and summary["steps"] == 2
    # rank x (3 layers x (in + out) of q (32 + 64), v (32 + 32); 2 sparse layers x 4 experts
    # x gate, up, down (32 + 24 each); 2 sparse layers x the router (32 + 4))
    assert summary["trainable_params"] == summary["rank"] * (3 * (96 + 64) + 2 * 4 * 3 * 56
                                                             + 2 * 36)
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["aux_loss"])
        assert m["aux_loss"] > 0.0
        load = np.asarray(m["expert_load"])
        assert load.shape == (2, 4)  # the two sparse layers, 4 experts
        np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-5)
    # the run's adapter exports with the targets it was built with, and loads back
    peft_dir = str(tmp_path / "peft")
    assert cli.main(["export", "--run", run_dir, "--peft", peft_dir]) == 0
    lcfg, tree = lora.load_peft(peft_dir, qwen3.Qwen3Config.from_hf(moe_dir))
    assert lcfg.targets == EXPERT_TARGETS
    assert np.abs(np.asarray(tree["layers"]["mlp"]["experts"]["down_proj"]["lora_b"])).max() > 0


def test_lora_targets_on_an_moe_model(moe_dir):
    model_config = qwen3.Qwen3Config.from_hf(moe_dir)
    default = config.load(None, [f"model.path={moe_dir}"])
    assert trainer.lora_config(default, model_config).targets == qwen3.ATTN_PROJS
    chosen = config.load(None, [f"model.path={moe_dir}", "lora.targets=[q_proj,v_proj]"])
    assert trainer.lora_config(chosen, model_config).targets == ("q_proj", "v_proj")
    mlp = config.load(None, [f"model.path={moe_dir}", "lora.targets=[q_proj,up_proj,gate]"])
    assert trainer.lora_config(mlp, model_config).targets == ("q_proj", "up_proj", "gate")
    dropout = config.load(None, [f"model.path={moe_dir}", "lora.targets=[up_proj]",
                                 "lora.dropout=0.1"])
    with pytest.raises(ConfigError, match="lora.targets.*no dropout"):
        trainer.lora_config(dropout, model_config)
    tensor = config.load(None, [f"model.path={moe_dir}", "train.mode=mesh", "train.mesh_tensor=2"])
    with pytest.raises(ConfigError, match="mesh_tensor=2: tensor parallelism for a mixture"):
        trainer.setup.check_tensor(tensor, model_config)
    rollout = config.load(None, [f"model.path={moe_dir}", "train.mode=mesh",
                                 "rollout.mesh_tensor=2"])
    with pytest.raises(ConfigError, match="rollout.mesh_tensor=2: tensor parallelism"):
        trainer.setup.check_tensor(rollout, model_config)


def test_prompts_are_shared_on_dense_models_without_dropout(moe_dir):
    dense = qwen3.Qwen3Config.from_hf(os.path.join(ASSETS, "tiny-arith"))
    assert trainer.setup.share_prompts(config.load(None, []), dense)  # the default on CPU
    assert trainer.setup.share_prompts(config.load(None, ["train.share_prompts=true"]), dense)
    assert not trainer.setup.share_prompts(config.load(None, ["lora.dropout=0.05"]), dense)
    assert not trainer.setup.share_prompts(config.load(None, ["train.share_prompts=false"]), dense)
    moe = qwen3.Qwen3Config.from_hf(moe_dir)  # routing statistics count every row's tokens
    assert not trainer.setup.share_prompts(config.load(None, [f"model.path={moe_dir}"]), moe)
