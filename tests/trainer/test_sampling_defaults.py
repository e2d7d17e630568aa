"""The trainer's choice of sampling path (`rollout.merge_lora`): merged weights on CPU with
float32 weights, the low-rank side path otherwise or when set; a merged rollout of the demo gives
the low-rank rollout's completions and log-probs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from arca_jax import config, lora
from arca_jax.trainer import setup
from arca_jax.trainer.rollout import encode_prompts, generate_rows, step_prompt_indices


def test_merged_on_cpu_float32_only():
    cfg = config.load(None, ["model.dtype=float32"])
    model = setup.load_model(cfg)
    assert jax.default_backend() == "cpu" and setup.merge_lora(cfg, model)
    bf16 = dataclasses.replace(model, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                          model.params))
    assert not setup.merge_lora(cfg, bf16)  # merging would round the adapter's update away
    assert not setup.merge_lora(config.load(None, ["rollout.merge_lora=false"]), model)
    assert setup.merge_lora(config.load(None, ["rollout.merge_lora=true"]), bf16)


def test_gathered_weights_on_a_mesh_with_fsdp_when_set_or_when_they_fit():
    """`rollout.gather_weights`: None decides by the chip's published memory (none on CPU: not
    gathered); set, it holds on any mesh with "fsdp" > 1; without a mesh or "fsdp" nothing is
    gathered."""
    from arca_jax import parallel

    model = setup.load_model(config.load(None, []))
    fsdp = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    on = config.load(None, ["rollout.gather_weights=true"])
    assert not setup.gather_weights(config.load(None, []), model, fsdp)  # CPU: no figure
    assert setup.gather_weights(on, model, fsdp)
    assert not setup.gather_weights(on, model, None)
    assert not setup.gather_weights(on, model, parallel.make_mesh(data=4, fsdp=1, tensor=2))


def test_merged_rollout_equals_low_rank():
    cfg = config.load(None, ["model.dtype=float32", "rollout.prompts_per_step=4",
                             "rollout.group_size=4", "rollout.max_new_tokens=24"])
    model = setup.load_model(cfg)
    task = setup.load_train_task(cfg)
    key = jax.random.PRNGKey(3)
    tree = lora.init_lora(model.config, setup.lora_config(cfg, model.config), key)
    tree = jax.tree_util.tree_map_with_path(  # an adapter that acts (B random)
        lambda p, x: 0.05 * jax.random.normal(jax.random.fold_in(key, len(str(p))), x.shape)
        if "lora_b" in str(p) else x, tree)
    idx = step_prompt_indices(0, 0, len(task.problems), 4)
    ids, mask = encode_prompts(model.tokenizer, [task.problems[i].prompt for i in idx], 64,
                               model.pad_id, "left")
    out = {merge: generate_rows(model, None, ids, mask, group_size=4, rng=key, lora=tree,
                                lora_scale=cfg.lora.scaling, max_new_tokens=24,
                                merge_lora=merge).out for merge in (False, True)}
    assert np.array_equal(out[True].tokens, out[False].tokens)
    assert np.array_equal(out[True].mask, out[False].mask)
    # W + s A B rounds once more than the low-rank path, and the two run different kernels (the
    # merged one the C++ decode call), whose sums' order depends on the CPU's vector width: the
    # median difference is ~1e-7, the largest 3.3e-5 (a log-prob of -2.27, on a CPU without AVX2),
    # against the adapter's own effect of more than 1e-3 (the last assertion)
    np.testing.assert_allclose(out[True].logps, out[False].logps, rtol=1e-5, atol=1e-4)
    base = generate_rows(model, None, ids, mask, group_size=4, rng=key, max_new_tokens=24).out
    assert not np.allclose(base.logps, out[False].logps, atol=1e-3)  # the adapter acts


def test_rollout_and_evaluation_sample_with_the_config_truncation(monkeypatch):
    """`rollout.temperature / top_k / top_p / min_p` reach the sampler in training rollouts and in
    evaluation's pass@k samples (its other pass is greedy); `draw`'s tests hold the truncation
    itself to transformers' warpers."""
    import importlib

    from arca_jax import parallel, sampling

    rollout_mod = importlib.import_module("arca_jax.trainer.rollout")  # the package exports
    evaluate = importlib.import_module("arca_jax.trainer.evaluate")    # functions of these names

    overrides = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
                 "rollout.temperature=0.9", "rollout.top_k=7", "rollout.top_p=0.8",
                 "rollout.min_p=0.3", "train.pass_k=2", "task.num_eval_problems=2"]
    cfg = config.load(None, overrides)
    model = setup.load_model(cfg)
    task = setup.load_train_task(cfg)
    seen = []
    real = sampling.generate

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("temperature", "top_k", "top_p", "min_p",
                                                 "greedy")})
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    rollout_mod.rollout(model, None, parallel.RowLayout(None, cfg.batch_size), task.problems[:2],
                        cfg, adapter=None, key=jax.random.PRNGKey(0),
                        score=rollout_mod.Scorer(task, 5.0))
    evaluate.evaluate(model, None, cfg.lora.scaling, task.problems[:2],
                      rollout_mod.Scorer(task, 5.0), cfg, 0, jax.random.PRNGKey(1))
    want = dict(temperature=0.9, top_k=7, top_p=0.8, min_p=0.3)
    sampled = [s for s in seen if not s["greedy"]]
    assert len(sampled) == 2 and all({k: s[k] for k in want} == want for s in sampled)
