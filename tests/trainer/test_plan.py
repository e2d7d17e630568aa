"""`arca-jax plan` on the tiny embedded model for the local CPU devices (8 forced host devices):
the report's fields, memory against an independent estimate, the loop scaling of the decode loop
and the microbatch scan, a "does not fit" verdict with the change that fits, the exit-2 paths,
and (with libtpu) a compile for a TPU slice."""

import dataclasses
import functools
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import cli, config, parallel, plan, qwen3
from arca_jax.plan import hlostats, search

FAST = {"xla_backend_optimization_level": 0}  # CPU compile speed; memory and shapes unchanged
# 4 prompts x 8 = 32 rows of 16 + 16 tokens, two microbatches, on a (data 2, fsdp 4) mesh; the
# evaluation's pass@k chunk: 5 problems x 2 samples = 10 rows, 16 on 8 devices
OVERRIDES = ["rollout.prompts_per_step=4", "rollout.group_size=8", "rollout.max_prompt_tokens=16",
             "rollout.max_new_tokens=16", "train.microbatches=2", "train.eval_batch_size=5",
             "train.pass_k=2",
             # the layers scanned, as on TPU and GPU (unrolled on CPU by default): the loop
             # scaling and remat below are about the scanned program a pod runs
             "grpo.scan_layers=true"]
LAYOUT = plan.Layout(2, 4, 1)


@pytest.fixture(scope="module")
def cfg():
    return config.load(None, OVERRIDES)


@pytest.fixture(scope="module")
def hlo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hlo"))


@pytest.fixture(scope="module")
def tiny_plan(cfg, hlo_dir):
    return plan.run(cfg, plan.local_target(), LAYOUT, options=FAST, search=False,
                    evaluation=True, hlo_dir=hlo_dir).plan


def _report(p, name):
    return next(r for r in p.programs if r.name == name)


def test_json_fields(tiny_plan):
    j = json.loads(json.dumps(plan.to_json(plan.Verdict(tiny_plan, None, (tiny_plan.knobs,)))))
    p = j["plan"]
    assert p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert p["global_batch"] == {"rows": 32, "tokens_per_row": 32, "tokens": 1024}
    assert p["sampler"]["decode_steps"] == 15 and p["sampler"]["eval_rows"] == 16
    assert p["sampler"]["weights_gathered_over_fsdp"] is False  # CPU: only when set
    assert p["target"]["platform"] == "cpu" and p["target"]["devices"] == 8
    assert p["target"]["peak_flops_per_device"] is None  # no published CPU peak: no roofline
    assert p["fits"] is True and p["problems"] == []
    assert p["train_state"]["total_bytes"] < p["train_state"]["replicated_total_bytes"]
    assert "train.microbatches=2" in p["trainer_overrides"]
    assert [r["name"] for r in p["programs"]] == ["train_step", "prepare_weights", "prefill",
                                                  "decode", "eval_prefill", "eval_decode"]
    assert [r["runs_per_step"] for r in p["programs"]] == [1, 1, 1, 1, 0, 0]
    for r in p["programs"]:
        mem = r["memory_bytes"]
        assert set(mem) == {"argument", "output", "temp", "alias", "code", "total", "resident",
                            "peak"}
        assert mem["argument"] > 0 and mem["output"] > 0 and mem["total"] > 0
        assert mem["peak"] == mem["total"] + mem["resident"]
        assert r["flops"] > 0 and r["bytes"] > 0 and r["fits"] is True
        assert r["roofline_s"] is None and r["mfu"] is None
        assert set(r["collectives"]) == set(hlostats.COLLECTIVES)
    train = p["programs"][0]
    assert train["collectives"]["all-gather"]["ops"] > 0  # fsdp gathers the base weights
    assert "once" in train["xla_cost_analysis"]["note"] and "once" in j["notes"]
    assert "verdict: fits" in plan.format_text(plan.Verdict(tiny_plan, None, ()))


def _param_bytes(cfg):
    shapes = qwen3.param_shapes(plan.model_config(cfg), jnp.dtype(cfg.model.dtype))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def test_memory_against_shapes(cfg, tiny_plan):
    """The train step's arguments hold each device's share of the base weights (at least
    1/fsdp of them; replicated leaves in full), of the adapter and its two Adam moments (1/fsdp:
    the state is split over fsdp, and every factor's wide dimension of this model divides by 4)
    and of the batch."""
    params = _param_bytes(cfg)
    c = plan.model_config(cfg)
    r, D, I, L = cfg.lora.rank, c.hidden_size, c.intermediate_size, c.num_hidden_layers
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    dims = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, I), (D, I), (I, D)]
    lora = 4 * L * sum(r * (i + o) for i, o in dims)  # float32 A [in, r] and B [r, out]
    batch = 32 * 32 * (4 * 6)  # 32 rows x 32 tokens: 4 int32 and 2 float32 columns
    train = _report(tiny_plan, "train_step").memory
    state = 3 * lora / LAYOUT.fsdp
    assert train.argument >= params / LAYOUT.fsdp + state + batch / LAYOUT.size
    assert train.argument <= params + state + 2 * batch
    assert train.alias > 0  # the donated train state
    decode = _report(tiny_plan, "decode").memory
    assert decode.resident >= params / LAYOUT.fsdp + state  # weights + state stay live
    assert tiny_plan.peak_bytes == max(r.memory.peak for r in tiny_plan.programs)


def test_train_state_bytes(cfg, tiny_plan):
    """The report's train state: `parallel.train_state_bytes` of the abstract state, and the same
    replicated over fsdp. Every factor's wide dimension of the tiny model divides by fsdp 4
    (tensor 1), so the adapter, its gradient and its two Adam moments (adapter-shaped, float32)
    are exactly 1/4 of their replicated bytes; the step, key and optimiser counters are not
    split."""
    c = plan.model_config(cfg)
    mesh = plan.make_mesh(LAYOUT, plan.local_target().devices)
    state = plan.abstract_model(cfg, c, mesh)[1]
    s = parallel.train_state_bytes(state, mesh, c.num_key_value_heads)
    r = parallel.train_state_bytes(state, mesh, c.num_key_value_heads, fsdp=False)
    assert tiny_plan.state == s and tiny_plan.replicated_state == r
    f = LAYOUT.fsdp
    assert r.adapter == f * s.adapter and r.gradient == f * s.gradient and r.other == s.other
    assert r.optimizer - s.optimizer == (f - 1) * 2 * s.adapter  # Adam's mu and nu
    j = plan.plan_json(tiny_plan)["train_state"]
    assert j == {"adapter_bytes": s.adapter, "optimizer_bytes": s.optimizer,
                 "gradient_bytes": s.gradient, "other_bytes": s.other, "total_bytes": s.total,
                 "replicated_total_bytes": r.total, "saving_bytes": r.total - s.total,
                 "share_of_peak": s.total / tiny_plan.peak_bytes}
    assert j["saving_bytes"] == (f - 1) * 4 * s.adapter  # adapter, two moments, gradient
    assert 0 < j["share_of_peak"] < 1
    assert "train state per device:" in plan.format_plan(tiny_plan)


def test_loop_scaling(cfg, tiny_plan):
    """XLA counts a loop body once: the decode loop is scaled by its 15 steps, the train step by
    its layer scans (3 layers) inside the 2-microbatch scan."""
    decode = _report(tiny_plan, "decode")
    assert decode.unknown_trip_count == 15 and None in decode.loops
    assert 0.7 * 15 < decode.flops / decode.xla_flops < 1.3 * 15
    train = _report(tiny_plan, "train_step")
    assert 2 in train.loops and 3 in train.loops
    assert train.flops > 4 * train.xla_flops
    prefill = _report(tiny_plan, "prefill")  # no loop: the two counts agree
    assert prefill.flops == pytest.approx(prefill.xla_flops, rel=0.1)


def test_hlo_dir(tiny_plan, hlo_dir):
    """Each program's compiled HLO is written; hlostats on it gives the report's figures."""
    for r in tiny_plan.programs:
        with open(os.path.join(hlo_dir, f"2-4-1_remat-False_mb-2_{r.name}.hlo")) as f:
            work = hlostats.analyze(f.read(), r.unknown_trip_count)
        assert (work.flops, work.bytes) == (r.flops, r.bytes)


def _dot_flops(jaxpr) -> int:
    """2 x output x contracted size of every dot_general in a jaxpr (sub-jaxprs included, a
    scan's body times its length): an independent count of the matmul work."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                    total += times * _dot_flops(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    total += times * _dot_flops(sub)
    return total


def _reference_flops(cfg, attention: str, devices: int):
    """(prefill low, prefill high, decode loop of 15 steps): the jaxpr's matmul flops per
    device. The prefill runs each group's prompt once: 4 prompts over `devices` devices, so a
    device does between 1/devices and 1/min(devices, 4) of it."""
    from arca_jax import lora, sampling

    c = plan.model_config(cfg)
    params = qwen3.param_shapes(c, jnp.dtype(cfg.model.dtype))
    adapter = jax.eval_shape(lambda: lora.init_lora(c, cfg.lora, jax.random.PRNGKey(0)))
    weights = jax.eval_shape(lambda p, a: qwen3.inference_weights(  # the mesh's matmuls: XLA's
        p, c, lora=a, lora_scale=2.0, decode_attention=attention, matmul="xla"), params, adapter)
    settings = sampling.SamplingConfig(max_new_tokens=16, eos_ids=(1,))
    ids = jax.ShapeDtypeStruct((32, 16), jnp.int32)
    prefill = functools.partial(sampling.prefill, config=c, settings=settings,
                                rng=jax.random.PRNGKey(0),
                                group_size=cfg.rollout.group_size)  # a prompt once per group
    first = _dot_flops(jax.make_jaxpr(lambda w, i: prefill(w, i, i))(weights, ids).jaxpr)
    state = jax.eval_shape(lambda w, i: prefill(w, i, i), weights, ids)
    step = jax.make_jaxpr(lambda w, s: sampling.decode_step(w, s, config=c, settings=settings))
    prompts = 32 // cfg.rollout.group_size
    return (first / devices, first / min(devices, prompts),
            15 * _dot_flops(step(weights, state).jaxpr) / devices)


def test_flops_against_the_jaxpr(cfg, tiny_plan):
    """Prefill and the whole decode loop against the jaxpr's matmul flops per device;
    elementwise work adds a little on top. The prefill admits its rows into the slots as the
    refill does (prompt rows gathered by index): on this 8-device mesh XLA splits the prompt
    forward's large matmuls 8 ways over their contracting dimension and keeps smaller parts
    whole, 1.30 x the ideal split over the 4 prompts (measured), so its bound is 1.4 x."""
    low, high, decode = _reference_flops(cfg, "reduce", 8)
    assert low <= _report(tiny_plan, "prefill").flops <= 1.4 * high
    assert decode <= _report(tiny_plan, "decode").flops <= 1.25 * decode


def test_train_step_flops_against_the_jaxpr(cfg, tiny_plan):
    """The train step's loop-scaled flops (2 microbatches x the layer scans) against the
    jaxpr's matmul flops per device; XLA's own count, each loop body once, is far below."""
    from arca_jax.grpo.step import make_train_step
    from arca_jax.trainer import setup

    c = plan.model_config(cfg)
    mesh = plan.make_mesh(LAYOUT, jax.devices())
    params, state, optimizer = plan.abstract_model(cfg, c, mesh)
    batch = plan.abstract_batch(cfg, plan.Shapes.of(cfg, 8), mesh)
    step = make_train_step(c, setup.objective_config(cfg), optimizer,
                           lora_scale=cfg.lora.scaling, mode="mesh", mesh=mesh, microbatches=2)
    want = _dot_flops(jax.make_jaxpr(step.jitted)(state, params, batch).jaxpr) / 8
    train = _report(tiny_plan, "train_step")
    assert want <= train.flops <= 1.15 * want
    assert train.xla_flops < 0.5 * want


def test_does_not_fit_and_the_change_that_fits(monkeypatch, cfg, tiny_plan):
    """Memory just below the plan's peak: "does not fit"; remat (recompiled) fits. The mesh
    changes are left out here to keep it to one compile (`test_find_fit_order` covers them)."""
    real = search.changes
    monkeypatch.setattr(search, "changes", lambda c, n: [x for x in real(c, n)
                                                         if x[0] in ("remat", "microbatches")])
    small = dataclasses.replace(tiny_plan.target, hbm_bytes=tiny_plan.peak_bytes - 1)
    first = dataclasses.replace(tiny_plan, target=small)
    assert first.fits is False
    verdict = plan.find_fit(cfg, first, options=FAST, max_tries=1)
    assert verdict.tried == (tiny_plan.knobs, plan.Knobs(LAYOUT, True, 2))
    assert verdict.suggestion is not None and verdict.suggestion.fits
    assert verdict.suggestion.peak_bytes < tiny_plan.peak_bytes
    assert verdict.peaks == (tiny_plan.peak_bytes, verdict.suggestion.peak_bytes)
    # the sampler's programs did not change: reused, not recompiled
    assert verdict.suggestion.programs[1:] == tiny_plan.programs[1:]
    text = plan.format_text(verdict)
    assert "does not fit" in text and "--set grpo.remat=true" in text
    j = plan.to_json(verdict)
    assert j["plan"]["fits"] is False and j["suggestion"]["fits"] is True


def test_find_fit_order(monkeypatch, cfg, tiny_plan):
    """The search on made-up peaks: every device on fsdp makes it worse (dropped), a tensor
    axis too, remat helps but is not enough (kept), two microbatches on top of remat fit."""
    peaks = {plan.Knobs(LAYOUT, False, 2): 100, plan.Knobs(plan.Layout(1, 8, 1), False, 2): 120,
             plan.Knobs(plan.Layout(1, 4, 2), False, 2): 110, plan.Knobs(LAYOUT, True, 2): 90,
             plan.Knobs(LAYOUT, True, 4): 60}
    target = dataclasses.replace(tiny_plan.target, hbm_bytes=80)
    train = tiny_plan.programs[0]

    def fake(cfg, target, knobs, options=None, reuse=None, log=None, evaluation=False,
             hlo_dir=None):
        memory = plan.Memory(0, 0, 0, 0, 0, peaks[knobs])
        report = dataclasses.replace(train, memory=memory)
        return dataclasses.replace(tiny_plan, target=target, knobs=knobs, programs=(report,),
                                   problems=tuple(plan.trainer_problems(cfg, knobs)))

    monkeypatch.setattr(search, "plan_once", fake)
    monkeypatch.setattr(search, "_valid_tensors", lambda config, devices: [2])
    first = fake(cfg, target, plan.Knobs(LAYOUT, False, 2))
    verdict = plan.find_fit(cfg, first)
    assert [(k.layout, k.remat, k.microbatches) for k in verdict.tried] == [
        (LAYOUT, False, 2), (plan.Layout(1, 8, 1), False, 2), (plan.Layout(1, 4, 2), False, 2),
        (LAYOUT, True, 2), (LAYOUT, True, 4)]
    assert verdict.peaks == (100, 120, 110, 90, 60)
    assert verdict.suggestion.knobs == plan.Knobs(LAYOUT, True, 4)
    verdict = plan.find_fit(cfg, first, max_tries=2)  # stops after two compiles
    assert len(verdict.tried) == 3 and verdict.suggestion is None


def test_find_fit_tries_a_rollout_mesh_when_the_sampler_is_the_largest(monkeypatch, cfg,
                                                                       tiny_plan):
    """Made-up peaks with the decode the largest program: fsdp for everything is worse
    (dropped), a tensor axis for the rollouts alone fits, and the trainer's options carry it.
    With the train step the largest, the rollout-only changes are not tried."""
    peaks = {plan.Knobs(LAYOUT, False, 2): 100, plan.Knobs(plan.Layout(1, 8, 1), False, 2): 120,
             plan.Knobs(LAYOUT, False, 2, 2): 70}
    target = dataclasses.replace(tiny_plan.target, hbm_bytes=80)
    decode = _report(tiny_plan, "decode")

    def fake(cfg, target, knobs, options=None, reuse=None, log=None, evaluation=False,
             hlo_dir=None, largest=decode):
        memory = plan.Memory(0, 0, 0, 0, 0, peaks.get(knobs, 200))
        return dataclasses.replace(tiny_plan, target=target, knobs=knobs,
                                   programs=(dataclasses.replace(largest, memory=memory),),
                                   problems=tuple(plan.trainer_problems(cfg, knobs)))

    monkeypatch.setattr(search, "plan_once", fake)
    monkeypatch.setattr(search, "_valid_tensors", lambda config, devices: [2])
    verdict = plan.find_fit(cfg, fake(cfg, target, plan.Knobs(LAYOUT, False, 2)))
    assert verdict.tried == (plan.Knobs(LAYOUT, False, 2), plan.Knobs(plan.Layout(1, 8, 1), False, 2),
                             plan.Knobs(LAYOUT, False, 2, 2))
    assert verdict.suggestion.knobs.overrides()[-1] == "rollout.mesh_tensor=2"
    assert "--set rollout.mesh_tensor=2" in plan.format_text(verdict)
    assert plan.to_json(verdict)["tried"][2]["rollout_tensor"] == 2
    train = _report(tiny_plan, "train_step")
    monkeypatch.setattr(search, "plan_once", lambda *a, **k: fake(*a, **k, largest=train))
    verdict = plan.find_fit(cfg, fake(cfg, target, plan.Knobs(LAYOUT, False, 2), largest=train))
    assert all(k.rollout_tensor is None for k in verdict.tried)


def test_a_fitting_plan_whose_decode_gathers_weights_gets_faster_rollouts(monkeypatch, cfg,
                                                                          tiny_plan):
    """Made-up plans: the asked setting fits but its decode loop all-gathers the weights at every
    step; a tensor axis of 2 for the rollouts still does (passed over), 4 and 8 keep them in
    place and 4 has the shorter rollout: the verdict's `faster`, with the trainer's options, in
    the text and the JSON. A plan whose decode gathers nothing is left alone (no compile)."""
    C = hlostats.Collective
    decode = _report(tiny_plan, "decode")
    gathers = {None: True, 2: True, 4: False, 8: False}
    rollout_s = {None: 10.0, 2: 4.0, 4: 3.0, 8: 3.5}
    compiled = []

    def fake(cfg, target, knobs, options=None, reuse=None, log=None, evaluation=False,
             hlo_dir=None):
        compiled.append(knobs)
        coll = {"all-gather": C(1, 15.0, 1e12 if gathers[knobs.rollout_tensor] else 0.0)}
        report = dataclasses.replace(decode, collectives=coll, bytes=1e9,
                                     roofline_s=rollout_s[knobs.rollout_tensor])
        return dataclasses.replace(tiny_plan, knobs=knobs, programs=(report,), problems=())

    monkeypatch.setattr(search, "plan_once", fake)
    monkeypatch.setattr(search, "_valid_tensors", lambda config, devices: [2, 4, 8])
    verdict = plan.run(cfg, tiny_plan.target, LAYOUT)
    assert verdict.plan.fits and verdict.plan.decode_gathers_weights
    assert [k.rollout_tensor for k in compiled] == [None, 2, 4, 8]
    assert verdict.faster.knobs == dataclasses.replace(verdict.plan.knobs, rollout_tensor=4)
    assert verdict.suggestion is None
    assert [k.rollout_tensor for k in verdict.tried] == [None, 2, 4, 8]  # every one compiled
    assert verdict.rollouts == (10.0, 4.0, 3.0, 3.5)  # roofline (no interconnect figure on CPU)
    assert "rollout tensor 8: peak" in plan.format_text(verdict)
    assert plan.to_json(verdict)["tried"][3]["rollout_with_interconnect_s"] == 3.5
    text = plan.format_text(verdict)
    assert "faster rollouts" in text and "--set rollout.mesh_tensor=4" in text
    assert plan.to_json(verdict)["faster"]["trainer_overrides"][-1] == "rollout.mesh_tensor=4"
    gathers[None] = False
    compiled.clear()
    assert plan.run(cfg, tiny_plan.target, LAYOUT).faster is None and len(compiled) == 1


def test_changes_in_order(cfg):
    knobs = plan.Knobs(plan.Layout(2, 4, 1), False, 2)
    got = plan.changes(cfg, 8)
    names = [c.name for c in got]
    assert names[0] == "fsdp" and names[-5:] == ["remat"] + ["microbatches"] * 4
    changed = {c.name: c.apply for c in got}
    # the rollouts' tensor axis alone before the axis for both, marked as the sampler's only
    assert names.index("rollout tensor=2") < names.index("tensor=2")
    assert [c.sampler_only for c in got] == [n.startswith("rollout") for n in names]
    assert changed["rollout tensor=2"](knobs) == dataclasses.replace(knobs, rollout_tensor=2)
    assert changed["rollout tensor=2"](dataclasses.replace(knobs, rollout_tensor=4)) is None
    assert dataclasses.replace(knobs, rollout_tensor=4).overrides()[-1] == \
        "rollout.mesh_tensor=4"
    assert changed["fsdp"](knobs).layout == plan.Layout(1, 8, 1)
    assert changed["fsdp"](changed["fsdp"](knobs)) is None
    assert changed["remat"](knobs) == plan.Knobs(plan.Layout(2, 4, 1), True, 2)
    assert changed["microbatches"](knobs).microbatches == 4
    assert changed["microbatches"](dataclasses.replace(knobs, microbatches=4)) is None  # 32 / 8
    # the tiny model has 4 heads: tensor 2 and 4
    assert "tensor=2" in names and changed["tensor=2"](knobs).layout == plan.Layout(1, 4, 2)


def test_tensor_axis(cfg, tiny_plan):
    """A (fsdp 4, tensor 2) mesh: the base weights and the adapter split over "tensor" as well,
    so each device holds less of them than on (data 2, fsdp 4); the tensor all-reduces show."""
    p = plan.run(cfg, plan.local_target(), plan.Layout(1, 4, 2), options=FAST, search=False).plan
    assert p.fits and p.knobs.overrides()[:3] == ["train.mode=mesh", "train.mesh_fsdp=4",
                                                  "train.mesh_tensor=2"]
    train, base = _report(p, "train_step"), _report(tiny_plan, "train_step")
    assert train.memory.argument < base.memory.argument
    assert train.collectives["all-reduce"].runs > 0
    assert [r.name for r in p.programs] == ["train_step", "prepare_weights", "prefill", "decode"]


def test_sampler_weights_gathered_when_set(cfg, tiny_plan):
    """`rollout.gather_weights=true` on (data 2, fsdp 4): the plan says so, the weight
    preparation gathers the weights and the decode loop reads them in place (fewer bytes moved
    per device than with them split over fsdp)."""
    on = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, gather_weights=True))
    p = plan.run(on, plan.local_target(), LAYOUT, options=FAST, search=False).plan
    assert p.sampler_gathered and not tiny_plan.sampler_gathered
    assert "weights gathered over fsdp" in plan.format_plan(p)
    moved = lambda q, name: sum(c.bytes for c in _report(q, name).collectives.values())
    assert moved(p, "prepare_weights") > moved(tiny_plan, "prepare_weights")
    assert moved(p, "decode") < moved(tiny_plan, "decode")
    # split, the decode loop gathers the kernels' fsdp parts at every step (more than a tenth of
    # its HBM bytes), and the text says so; gathered once, it does not
    steps = tiny_plan.shapes.new_tokens - 1
    split_decode = _report(tiny_plan, "decode")
    assert tiny_plan.decode_gathers_weights and not p.decode_gathers_weights
    assert tiny_plan.decode_gathered_per_step == pytest.approx(
        split_decode.collectives["all-gather"].bytes / steps)
    assert tiny_plan.decode_gathered_per_step > 0.1 * split_decode.bytes / steps
    assert "the decode loop all-gathers" in plan.format_plan(tiny_plan)
    assert "the decode loop all-gathers" not in plan.format_plan(p)
    j = plan.to_json(plan.Verdict(tiny_plan, None, (tiny_plan.knobs,)))["plan"]["sampler"]
    assert j["decode_all_gather_bytes_per_step"] == tiny_plan.decode_gathered_per_step


def test_sampler_on_a_rollout_mesh_of_its_own(cfg, tiny_plan):
    """`rollout.mesh_tensor=4` with the update on (data 2, fsdp 4): the train step is the same
    program, the sampler's run on (data 2, fsdp 1, tensor 4) (the weight preparation reading the
    train layout), the plan says so, and each device holds a quarter of the sampling weights, read
    in place by every decode step (no kernel gathered). At these tiny shapes the cache, whose rows
    now split over data 2 only, outweighs the weights; at Qwen3-1.7B's the decode's bytes per
    device fall (README, "Mesh shapes")."""
    # the rollout mesh from the knobs (as the search changes it), the train step reused
    p = plan.plan_once(cfg, plan.local_target(),
                       dataclasses.replace(tiny_plan.knobs, rollout_tensor=4), FAST,
                       reuse=tiny_plan)
    assert p.program("train_step") is tiny_plan.program("train_step")
    assert p.knobs.overrides()[-1] == "rollout.mesh_tensor=4"
    gathered = plan.run(
        dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, gather_weights=True)),
        plan.local_target(), LAYOUT, options=FAST, search=False).plan
    assert p.sampler_layout == plan.Layout(2, 1, 4) and tiny_plan.sampler_layout is None
    assert not p.sampler_gathered  # fsdp 1 on the rollout mesh: nothing to gather
    assert "on the mesh data=2,fsdp=1,tensor=4 (rollout.mesh_fsdp / mesh_tensor)" in \
        plan.format_plan(p)
    j = plan.to_json(plan.Verdict(p, None, (p.knobs,)))["plan"]
    assert j["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert j["sampler"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert [r.name for r in p.programs][:4] == ["train_step", "prepare_weights", "prefill",
                                                "decode"]
    assert not p.decode_gathers_weights
    # the sampling weights per device: a quarter of the whole ones (the embedding and the fused
    # kernels split over "tensor"; norms and the like replicated)
    held = lambda q: _report(q, "prepare_weights").memory.output  # noqa: E731
    assert held(p) < 0.4 * held(gathered), (held(p), held(gathered))
    assert _report(p, "decode").collectives["all-reduce"].runs > 0  # the tensor all-reduces


def test_interconnect_estimate(tiny_plan):
    """`interconnect_seconds`: 4 x all-reduced + 2 x other collectives' bytes over the link
    bandwidth, from `hlostats.Collective`s or the JSON's dicts; none without a bandwidth (the
    local CPU devices). A plan sums its programs' estimates times their runs per step, apart
    from the roofline; the published TPU figures are per chip, shared by its devices."""
    C = hlostats.Collective
    coll = {"all-reduce": C(2, 10.0, 1e9), "all-gather": C(1, 5.0, 3e9),
            "collective-permute": C(1, 1.0, 0.5e9), "all-to-all": C(0, 0.0, 0.0)}
    assert plan.interconnect_seconds(coll, 400e9) == pytest.approx((4e9 + 6e9 + 1e9) / 400e9)
    as_json = {k: {"ops": c.ops, "runs": c.runs, "bytes": c.bytes} for k, c in coll.items()}
    assert plan.interconnect_seconds(as_json, 400e9) == plan.interconnect_seconds(coll, 400e9)
    assert plan.interconnect_seconds(coll, None) is None
    assert plan.local_target().link_bandwidth is None  # CPU: no published figure
    assert all(r.interconnect_s is None for r in tiny_plan.programs)
    assert tiny_plan.update_interconnect_s is None and "interconnect, apart" not in \
        plan.format_plan(tiny_plan)
    assert plan.CHIPS["v5e"].link_bandwidth == 400e9 and plan.CHIPS["v4"].link_bandwidth is None
    # the same programs on a chip with a figure: each program's estimate from its collectives
    link = 400e9
    programs = tuple(dataclasses.replace(r, interconnect_s=plan.interconnect_seconds(
        r.collectives, link)) for r in tiny_plan.programs)
    p = dataclasses.replace(tiny_plan, programs=programs)
    want = sum(plan.interconnect_seconds(r.collectives, link) * r.runs_per_step
               for r in programs if r.name in ("prepare_weights", "prefill", "decode"))
    assert p.rollout_interconnect_s == pytest.approx(want) and want > 0
    assert p.update_interconnect_s == pytest.approx(
        plan.interconnect_seconds(_report(p, "train_step").collectives, link)
        * _report(p, "train_step").runs_per_step)
    assert "interconnect, apart: update" in plan.format_plan(p)
    j = plan.plan_json(p)
    assert j["rollout_interconnect_s"] == p.rollout_interconnect_s
    assert j["programs"][0]["interconnect_s"] == programs[0].interconnect_s


def test_trainer_problems(cfg):
    assert plan.trainer_problems(cfg, plan.Knobs(plan.Layout(1, 8, 1), False, 2)) == []
    problems = plan.trainer_problems(cfg, plan.Knobs(plan.Layout(1, 8, 1), False, 8))
    assert "divisible by the 8 devices" in problems[0]


def test_layout_and_topology_parsing():
    assert plan.Layout.parse("1,8,1", 8) == plan.Layout(1, 8, 1)
    assert plan.Layout.parse("2,4", 8) == plan.Layout(2, 4, 1)
    for bad in ("2,2,1", "a,b", "0,8,1"):
        with pytest.raises(plan.PlanError):
            plan.Layout.parse(bad, 8)
    assert plan.parse_topology("v5e:4x4") == ("v5e", (4, 4))
    assert plan.parse_topology("v5p:2x2x4") == ("v5p", (2, 2, 4))
    for bad in ("v5e", "v5e:4x", "v9:2x2", "cpu:2x2"):
        with pytest.raises(plan.PlanError):
            plan.parse_topology(bad)


def test_model_from_preset_without_weights():
    cfg = config.load(None, ["model.path=Qwen/Qwen3-32B-Base"])
    assert plan.model_config(cfg) == qwen3.preset("Qwen3-32B")
    with pytest.raises(plan.PlanError, match="no preset"):
        plan.model_config(config.load(None, ["model.path=Qwen/Qwen3-3B"]))


def test_cli_json(monkeypatch, capsys, tiny_plan):
    """The command prints the verdict's JSON (the compile itself is the fixture's)."""
    seen = {}

    def fake_run(cfg, target, layout, search, max_tries, log, evaluation, hlo_dir):
        seen.update(layout=layout, search=search, rows=cfg.batch_size, evaluation=evaluation)
        return plan.Verdict(tiny_plan, None, (tiny_plan.knobs,))

    monkeypatch.setattr(plan, "run", fake_run)
    assert cli.main(["plan", "--json", "--mesh", "2,4,1", "--no-search"]
                    + [a for o in OVERRIDES for a in ("--set", o)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["fits"] is True and out["plan"]["mesh"]["fsdp"] == 4
    assert seen == dict(layout=LAYOUT, search=False, rows=32, evaluation=False)


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "3,3,1"], "--mesh '3,3,1': 9 devices, the target has 8"),
    (["--set", "model.path=Qwen/Qwen3-3B"], "no preset of that name"),
    (["--topology", "v5e:4x"], "expected GENERATION:AxB"),
    (["--hbm", "0"], "--hbm must be a positive"),
])
def test_cli_bad_input_exits_2(capsys, argv, message):
    assert cli.main(["plan"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_without_libtpu_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    monkeypatch.delenv(plan.LIBTPU_DIR_ENV, raising=False)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert cli.main(["plan", "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'arca-jax[tpu]'" in err and len(err.splitlines()) == 1


def _libtpu_available() -> bool:
    d = os.environ.get(plan.LIBTPU_DIR_ENV)
    return (importlib.util.find_spec("libtpu") is not None
            or bool(d and os.path.isdir(os.path.join(d, "libtpu"))))


@pytest.mark.skipif(not _libtpu_available(),
                    reason="needs libtpu: pip install 'arca-jax[tpu]', or pip install --target "
                           "DIR libtpu and set ARCA_JAX_LIBTPU_DIR=DIR")
def test_tpu_topology(cfg):
    """Compiles the tiny model's programs for a v5e 2x2 slice with libtpu (no TPU needed)."""
    target = plan.tpu_target("v5e:2x2")
    assert target.size == 4 and target.chip.name == "TPU v5e"
    assert target.hbm_bytes == 16 * plan.GiB and target.peak_flops == 197e12
    assert target.link_bandwidth == 400e9  # one device per v5e chip
    p = plan.run(cfg, target, search=False).plan
    for r in p.programs:
        assert r.interconnect_s == pytest.approx(plan.interconnect_seconds(r.collectives, 400e9))
    assert p.update_interconnect_s > 0  # fsdp 4 gathers the base weights
    assert p.knobs.layout == plan.Layout(1, 4, 1) and p.fits
    for r in p.programs:
        assert r.memory.argument > 0 and r.roofline_s > 0 and r.bound in ("compute", "memory")
        assert 0 < r.mfu <= 1
    assert p.update_s > 0 and p.rollout_s > 0
    decode = _report(p, "decode")
    assert decode.flops > 10 * decode.xla_flops  # 15 decode steps, counted once by XLA
    low, high, decode_flops = _reference_flops(cfg, "dot", 4)
    assert 0.9 * low <= _report(p, "prefill").flops <= 1.25 * high
    assert 0.9 * decode_flops <= decode.flops <= 1.25 * decode_flops


# --------------------------------------------------------------------------------------------
# hlostats on small programs
# --------------------------------------------------------------------------------------------


def _matmuls(x, w):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]


def _xla_flops(compiled):
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_hlostats_scales_scan_bodies():
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((6, 128, 128), jnp.float32)
    compiled = jax.jit(_matmuls).lower(x, w).compile()
    text = compiled.as_text()
    once = hlostats.analyze(text, scale_loops=False)
    work = hlostats.analyze(text)
    assert work.loops == (6,)
    assert once.flops == pytest.approx(_xla_flops(compiled), rel=0.05)  # XLA: the body once
    assert work.flops == pytest.approx(6 * once.flops, rel=0.05)
    assert once.flops >= 2 * 64 * 128 * 128


def test_hlostats_unknown_trip_count():
    def loop(x, n):
        return jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ c[0], c[1] + 1),
                                  (x, 0))[0]

    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    text = jax.jit(loop).lower(x, jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
    assert hlostats.analyze(text, unknown_trip_count=10).loops == (None,)
    ten, one = (hlostats.analyze(text, unknown_trip_count=n).flops for n in (10, 1))
    assert ten == pytest.approx(10 * one, rel=0.05) and one >= 2 * 32 ** 3


def test_hlostats_loop_instructions():
    """The instructions inside loops (bodies, conditions, what they call or branch to), not the
    entry's: a module whose entry copies one array and whose loop body copies another."""
    text = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%branch_a (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %copy.3 = f32[8]{0} copy(f32[8]{0} %p)
}

%branch_b (q: f32[8]) -> f32[8] {
  ROOT %q = f32[8]{0} parameter(0)
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8]{0} get-tuple-element(%t), index=1
  %copy.2 = f32[8]{0} copy(f32[8]{0} %x)
  %y = f32[8]{0} conditional(s32[] %i, f32[8]{0} %copy.2, f32[8]{0} %x), branch_computations={%branch_a, %branch_b}
  ROOT %r = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %y)
}

%cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(s32[] %j, s32[] %n), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %copy.1 = f32[4]{0} copy(f32[4]{0} %a)
  %z = s32[] constant(0)
  %b = f32[8]{0} broadcast(f32[4]{0} %copy.1), dimensions={}
  %t0 = (s32[], f32[8]{0}) tuple(s32[] %z, f32[8]{0} %b)
  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %t0), condition=%cond, body=%body
  ROOT %out = f32[4]{0} copy(f32[4]{0} %a)
}
"""
    inside = hlostats.loop_instructions(text)
    assert sorted(i.name for i in inside if i.opcode == "copy") == ["copy.2", "copy.3"]
    assert "lt" in {i.name for i in inside} and "copy.1" not in {i.name for i in inside}


def test_hlostats_counts_collectives():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("d",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=spec)
    text = jax.jit(lambda a: jnp.sum(a, axis=0)).lower(x).compile().as_text()
    work = hlostats.analyze(text)
    assert work.collectives["all-reduce"].ops >= 1 and work.collectives["all-reduce"].runs >= 1
    assert work.collectives["all-reduce"].bytes >= 16 * 4


def test_hlostats_shapes():
    assert hlostats.type_bytes("(f32[2,3]{1,0}, bf16[4], s32[], pred[8])") == 24 + 8 + 4 + 8
    tpu = "bf16[3,16,64]{2,1,0:T(8,128)(2,1)S(1)}"  # in on-chip memory: no HBM bytes
    assert hlostats.array_shapes(tpu) == [("bf16", (3, 16, 64))]
    assert hlostats.type_bytes(tpu) == 2 * 3 * 16 * 64 and hlostats.hbm_bytes(tpu) == 0


FUSED_CONDITION = """HloModule m

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,4] get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[4,4] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,4]) tuple(%next, %y)
}

%fused_lt (param_0: s32[], param_1: s32[]) -> pred[] {
  %param_0 = s32[] parameter(0)
  %param_1 = s32[] parameter(1)
  ROOT %lt = pred[] compare(%param_0, %param_1), direction=LT
}

%cond (c: (s32[], f32[4,4])) -> pred[] {
  %c = (s32[], f32[4,4]) parameter(0)
  %n = s32[] constant(7)
  %j = s32[] get-tuple-element(%c), index=0
  ROOT %f = pred[] fusion(%j, %n), kind=kLoop, calls=%fused_lt
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,4]) tuple(%zero, %a)
  %w = (s32[], f32[4,4]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4,4] get-tuple-element(%w), index=1
}
"""


def test_hlostats_bound_of_a_fused_condition():
    """TPU's HLO has no known_trip_count: the bound is read from `i < n`, here inside a fusion."""
    work = hlostats.analyze(FUSED_CONDITION, unknown_trip_count=99)
    assert work.loops == (7,)
    assert work.flops == 7 * (2 * 4 * 4 * 4 + 1)  # the dot and the counter's add, 7 times


def test_hlostats_closing_brace_with_thread_or_name():
    """XLA prints a computation of another execution thread (TPU's SparseCore: the MoE's
    all-to-all) as `}, execution_thread="..."`, and long ones as `} // name`: both end it."""
    text = (FUSED_CONDITION
            .replace("direction=LT\n}", 'direction=LT\n}, execution_thread="sparsecore"')
            .replace("calls=%fused_lt\n}", "calls=%fused_lt\n} // cond"))
    assert 'execution_thread="sparsecore"' in text and "} // cond" in text
    work = hlostats.analyze(text, unknown_trip_count=99)
    assert work.loops == (7,)
    assert work.flops == 7 * (2 * 4 * 4 * 4 + 1)


def test_hlostats_counts_ragged_all_to_all_in_a_loop():
    """The mixture of experts' token exchange: a ragged-all-to-all (operands: input rows, the
    output buffer, offsets and sizes) in a 7-trip loop body counts as its own kind, 7 runs of
    its input's bytes (the most it can send); HBM: the input read, the result written."""
    text = (FUSED_CONDITION
            .replace("%y = f32[4,4] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
                     "%d = f32[4,4] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n"
                     "  %buf = f32[6,4] broadcast(f32[] constant(0)), dimensions={}\n"
                     "  %off = s32[2] constant({0, 2})\n"
                     "  %r = f32[6,4] ragged-all-to-all(%d, %buf, %off, %off, %off, %off), "
                     "channel_id=3, replica_groups={{0,1}}\n"
                     "  %y = f32[4,4] slice(%r), slice={[0:4], [0:4]}"))
    work = hlostats.analyze(text)
    assert work.loops == (7,)
    ragged = work.collectives["ragged-all-to-all"]
    assert (ragged.ops, ragged.runs, ragged.bytes) == (1, 7, 7 * 4 * 4 * 4)
    assert work.collectives["all-to-all"].runs == 0


def test_hlostats_loop_start_and_step():
    """A TPU windowed-einsum loop: counter in tuple slot 1, starting at 2 (through a copy),
    stepping by 2 while < 9: ceil((9 - 2) / 2) = 4 trips."""
    text = (FUSED_CONDITION
            .replace("(s32[], f32[4,4])", "(f32[4,4], s32[])")
            .replace("%i = s32[] get-tuple-element(%p), index=0",
                     "%i = s32[] get-tuple-element(%p), index=1")
            .replace("%x = f32[4,4] get-tuple-element(%p), index=1",
                     "%x = f32[4,4] get-tuple-element(%p), index=0")
            .replace("%one = s32[] constant(1)", "%one = s32[] constant(2)")
            .replace("tuple(%next, %y)", "tuple(%y, %next)")
            .replace("%j = s32[] get-tuple-element(%c), index=0",
                     "%j = s32[] get-tuple-element(%c), index=1")
            .replace("%n = s32[] constant(7)", "%n = s32[] constant(9)")
            .replace("%zero = s32[] constant(0)",
                     "%two = s32[] constant(2)\n  %zero = s32[] copy(%two)")
            .replace("tuple(%zero, %a)", "tuple(%a, %zero)")
            .replace("get-tuple-element(%w), index=1", "get-tuple-element(%w), index=0"))
    work = hlostats.analyze(text)
    assert work.loops == (4,)
    assert work.flops == 4 * (2 * 4 * 4 * 4 + 1)


class _Refused:
    """A lowered program whose compile fails with `message`, as libtpu's XlaRuntimeError does."""

    def __init__(self, message):
        self.message = message

    def compile(self, **_):
        raise RuntimeError(self.message)


# libtpu's message (its format string: "Ran out of memory in memory space hbm. Used $1 of $2 hbm.")
LIBTPU_OOM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
              "space hbm. Used 34.83G of 15.75G hbm. Exceeded hbm capacity by 19.08G.\n\n"
              "Total hbm usage >= 35.08G:\n    reserved        258.00M \n"
              "    program          34.83G \n")


def test_a_program_the_compiler_refuses_for_memory_does_not_fit():
    """libtpu refuses to compile a program whose temporaries exceed the chip's HBM
    (RESOURCE_EXHAUSTED): plan reports it as not fitting, one line, not a traceback, with the
    compiler's figures where its message has them; other compiler errors pass through."""
    from arca_jax.plan import programs

    oom = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (34.83G) exceeds available HBM (15.75G).")
    with pytest.raises(plan.PlanError, match=r"does not fit: .*34\.83G.*15\.75G") as e:
        programs._compile(_Refused("XlaRuntimeError\n" + oom), None, "train_step")
    assert "\n" not in str(e.value)
    assert e.value.refusal == plan.Refusal("train_step", oom, None, None)
    with pytest.raises(plan.RefusedError) as e:
        programs._compile(_Refused(LIBTPU_OOM), None, "decode")
    assert e.value.refusal == plan.Refusal("decode", LIBTPU_OOM.splitlines()[0],
                                           round(34.83 * 2 ** 30), round(15.75 * 2 ** 30))
    with pytest.raises(RuntimeError, match="INTERNAL"):
        programs._compile(_Refused("INTERNAL: something else"), None, "train_step")


def _fake_compiles(monkeypatch, tiny_plan, peaks, errors):
    """Replaces the compiles of `plan_once` (the real one runs): the train step of the knobs in
    `errors` fails with that compiler message (through `programs._compile`); any other reports
    `peaks[knobs]` bytes; no sampler programs; one tensor axis size, 2."""
    from arca_jax.plan import programs

    train = tiny_plan.programs[0]

    def compile_train_step(cfg, config, mesh, knobs, *args):
        if knobs in errors:
            programs._compile(_Refused(errors[knobs]), None, "train_step")
        return plan.Program("train_step", knobs, 0, 1, 1, 0.0)

    def report(program, target, hlo_dir=None, tag=""):
        memory = plan.Memory(0, 0, 0, 0, 0, peaks[program.compiled])
        return dataclasses.replace(train, memory=memory)

    monkeypatch.setattr(search, "compile_train_step", compile_train_step)
    monkeypatch.setattr(search, "compile_sampler", lambda *args, **kwargs: [])
    monkeypatch.setattr(search, "report_program", report)
    monkeypatch.setattr(search, "_valid_tensors", lambda config, devices: [2])


def test_search_goes_on_past_settings_the_compiler_refuses(monkeypatch, cfg, tiny_plan):
    """The asked setting is refused (libtpu's figure, 34.83 GiB, is its peak), every device on
    fsdp is refused without a figure: both are recorded as tried and do not fit; the tensor
    axis compiles (100 bytes, over the 80 the device has) and is kept; remat on top fits."""
    asked, wide = plan.Knobs(LAYOUT, False, 2), plan.Knobs(plan.Layout(1, 8, 1), False, 2)
    tensor = plan.Knobs(plan.Layout(1, 4, 2), False, 2)
    remat = dataclasses.replace(tensor, remat=True)
    bare = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456 bytes."
    _fake_compiles(monkeypatch, tiny_plan, {tensor: 100, remat: 60},
                   {asked: LIBTPU_OOM, wide: "XlaRuntimeError\n" + bare})
    target = dataclasses.replace(tiny_plan.target, hbm_bytes=80)
    logged = []
    verdict = plan.run(cfg, target, LAYOUT, log=logged.append)
    used = round(34.83 * 2 ** 30)
    assert verdict.plan.fits is False and verdict.plan.programs == ()
    assert verdict.plan.refused == plan.Refusal("train_step", LIBTPU_OOM.splitlines()[0], used,
                                                round(15.75 * 2 ** 30))
    assert verdict.tried == (asked, wide, tensor, remat)
    assert verdict.peaks == (used, None, 100, 60)
    assert [r and r.message for r in verdict.refusals] == [LIBTPU_OOM.splitlines()[0], bare,
                                                           None, None]
    assert verdict.suggestion.knobs == remat and verdict.suggestion.fits
    assert sum("the compiler refused train_step" in line for line in logged) == 2

    j = json.loads(json.dumps(plan.to_json(verdict)))
    assert j["plan"]["fits"] is False and j["plan"]["peak_gib_per_device"] == 34.83
    assert j["plan"]["refused"] == {"program": "train_step", "message": LIBTPU_OOM.splitlines()[0],
                                    "used_bytes": used, "available_bytes": round(15.75 * 2 ** 30),
                                    "used_gib": 34.83, "available_gib": 15.75}
    assert [t["refused"] for t in j["tried"]] == [LIBTPU_OOM.splitlines()[0], bare, None, None]
    assert [t["refused_program"] for t in j["tried"]] == ["train_step", "train_step", None, None]
    assert j["tried"][1]["peak_gib_per_device"] is None
    assert j["suggestion"]["fits"] is True and j["suggestion"]["refused"] is None

    text = plan.format_text(verdict)
    assert ("REFUSED by the compiler for lack of memory: train_step, 34.8 GiB of 15.8 GiB per "
            "device") in text
    assert "settings tried:" in text and text.count("REFUSED") == 3  # the plan, two tried
    assert "--set train.mesh_tensor=2 --set grpo.remat=true" in text


def test_a_broken_compile_in_the_search_is_an_error(monkeypatch, cfg, tiny_plan):
    """A compiler error other than lack of memory is not taken for "does not fit": it ends the
    search, for the asked setting as for a change tried."""
    asked, wide = plan.Knobs(LAYOUT, False, 2), plan.Knobs(plan.Layout(1, 8, 1), False, 2)
    target = dataclasses.replace(tiny_plan.target, hbm_bytes=80)
    _fake_compiles(monkeypatch, tiny_plan, {asked: 100}, {wide: "INTERNAL: Mosaic failed"})
    with pytest.raises(RuntimeError, match="INTERNAL: Mosaic failed"):
        plan.run(cfg, target, LAYOUT)
    _fake_compiles(monkeypatch, tiny_plan, {}, {asked: "INVALID_ARGUMENT: bad sharding"})
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan.run(cfg, target, LAYOUT)


def test_cli_reports_a_refused_setting(monkeypatch, capsys, tiny_plan):
    """`arca-jax plan --no-search` on a setting the compiler refuses: the verdict (exit 0) says it
    does not fit, with the compiler's line and figures, as JSON and as text."""
    asked = plan.Knobs(LAYOUT, False, 2)
    _fake_compiles(monkeypatch, tiny_plan, {}, {asked: LIBTPU_OOM})
    argv = ["plan", "--mesh", "2,4,1", "--no-search"] + [a for o in OVERRIDES for a in ("--set", o)]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["fits"] is False and out["suggestion"] is None
    assert out["plan"]["refused"]["used_gib"] == 34.83
    assert out["tried"] == [dict(mesh={"data": 2, "fsdp": 4, "tensor": 1}, remat=False,
                                 microbatches=2, rollout_tensor=None, peak_gib_per_device=34.83,
                                 rollout_with_interconnect_s=None,
                                 refused=LIBTPU_OOM.splitlines()[0], refused_program="train_step")]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "REFUSED by the compiler for lack of memory: train_step, 34.8 GiB" in text
    assert "verdict: does not fit" in text
