"""Pretrains the tiny arithmetic Qwen3 base model shipped in `arca_jax/assets/tiny-arith/`.

Supervised learning (next-token cross-entropy on solution tokens) on the embedded arithmetic task,
with this project's own model (`arca_jax.qwen3`) and optax. Deterministic for a given seed on one
machine.

Room for RL: like a real base model that follows the requested answer format only on some
problems, the pretraining corpus ends a solution with `\boxed{answer}` with probability
`--box-short` (0.85) for problems of at most two operations and `--box-long` (0.25) for longer
ones; the other solutions end with "Answer: N.", which the task's reward scores 0. Greedy decoding
therefore boxes short problems and not long ones, sampling sometimes boxes long ones too, and the
model makes some arithmetic slips: a reward-driven adapter can fix both. The held-out accuracy reached is recorded in
pretraining.json beside the weights.
The checkpoint is written with `hf.save_pretrained` plus the character tokenizer, so it loads
through exactly the path a real Qwen3 checkpoint uses.

    python experiments/pretrain_tiny.py                      # writes arca_jax/assets/tiny-arith
    python experiments/pretrain_tiny.py --steps 200 --out /tmp/tiny   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arca_jax import hf, qwen3
from arca_jax.tasks import load_task
from arca_jax.tasks.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, load_char_tokenizer, save_char_tokenizer

ASSET_DIR = os.path.join(os.path.dirname(__file__), "..", "arca_jax", "assets", "tiny-arith")

CONFIG = qwen3.Qwen3Config(
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
    rope_theta=10_000.0, max_position_embeddings=256, tie_word_embeddings=True,
    eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def unboxed(solution: str) -> str:
    r"""'... = 22. \boxed{22}' -> '... = 22. Answer: 22.' (same reasoning, no boxed answer)."""
    head, _, boxed = solution.rpartition("\\boxed{")
    return f"{head}Answer: {boxed[:-1]}."


def encode_sft(tokenizer, prompts, solutions, width):
    """Right-padded [N, width] ids, attention mask and loss mask (solution + EOS tokens)."""
    n = len(prompts)
    ids = np.full((n, width), PAD_ID, np.int32)
    attn = np.zeros((n, width), np.int32)
    loss = np.zeros((n, width), np.float32)
    for i, (p, s) in enumerate(zip(prompts, solutions)):
        p_ids = tokenizer.encode(p, add_special_tokens=False)
        s_ids = tokenizer.encode(s, add_special_tokens=False) + [EOS_ID]
        seq = (p_ids + s_ids)[:width]
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        loss[i, len(p_ids):len(seq)] = 1.0
    return ids, attn, loss


def greedy_accuracy(params, config, tokenizer, task, max_new_tokens=80, batch=256):
    """Held-out greedy accuracy with the task's own reward (the trainer's evaluation path)."""
    from arca_jax import config as run_config, trainer

    cfg = run_config.load(None, [f"rollout.max_new_tokens={max_new_tokens}",
                                 "rollout.max_prompt_tokens=256",
                                 f"train.eval_batch_size={batch}"])
    model = trainer.Model(config, params, tokenizer, EOS_ID, PAD_ID)
    rewards = trainer.greedy_rewards(model, None, 1.0, list(task.problems),
                                     trainer.Scorer(task, cfg.task.reward_timeout_s), cfg,
                                     jax.random.PRNGKey(0))
    return float(np.mean(rewards)), len(rewards), by_ops(task.problems, rewards)


def by_ops(problems, rewards):
    """Greedy accuracy and count per number of operations: {ops: [accuracy, problems]}."""
    ops = np.asarray([p.meta["num_ops"] for p in problems])
    return {int(k): [float(np.mean(np.asarray(rewards)[ops == k])), int(np.sum(ops == k))]
            for k in sorted(set(ops.tolist()))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=ASSET_DIR)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--box-short", type=float, default=0.85,
                    help="probability that a solution of <= 2 operations ends with \\boxed{}")
    ap.add_argument("--box-long", type=float, default=0.25,
                    help="probability that a solution of > 2 operations ends with \\boxed{}")
    args = ap.parse_args(argv)
    t0 = time.time()

    os.makedirs(args.out, exist_ok=True)
    save_char_tokenizer(args.out, model_max_length=CONFIG.max_position_embeddings)
    tokenizer = load_char_tokenizer(args.out)
    train = load_task("arithmetic", "train", max_samples=args.train_size)
    test = load_task("arithmetic", "test", max_samples=args.eval_size)
    p_box = np.array([args.box_short if p.meta["num_ops"] <= 2 else args.box_long
                      for p in train.problems])
    keep_box = np.random.default_rng(args.seed + 1).random(len(train)) < p_box
    solutions = [p.solution if k else unboxed(p.solution) for p, k in zip(train.problems, keep_box)]
    ids, attn, loss_mask = encode_sft(tokenizer, [p.prompt for p in train.problems], solutions,
                                      width=96)
    print(f"train {len(train)} sequences, test {len(test)}, vocab {VOCAB_SIZE}")

    params = qwen3.init_params(CONFIG, jax.random.PRNGKey(args.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"model: {n_params:,} parameters")
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                  args.steps, end_value=args.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, ids, attn, loss_mask):
        def loss_fn(p):
            logits = qwen3.forward(p, ids, config=CONFIG, attention_mask=attn).logits
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            m = loss_mask[:, 1:]
            return jnp.sum(nll * m) / jnp.sum(m)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    order = np.random.default_rng(args.seed)
    history = []
    for i in range(args.steps):
        idx = order.integers(0, len(ids), args.batch)
        params, opt_state, loss = step(params, opt_state, ids[idx], attn[idx], loss_mask[idx])
        if (i + 1) % 100 == 0 or i == 0:
            print(f"step {i + 1:5d}  loss {float(loss):.4f}  {time.time() - t0:6.1f}s", flush=True)
        if args.eval_every and (i + 1) % args.eval_every == 0:
            acc, _, _ = greedy_accuracy(params, CONFIG, tokenizer, test)
            history.append({"step": i + 1, "greedy_accuracy": acc})
            print(f"  held-out greedy accuracy {acc:.3f}", flush=True)

    hf.save_pretrained(args.out, CONFIG, params)
    config, loaded = hf.load_pretrained(args.out, dtype=jnp.float32)  # the real loading path
    acc, n, per_ops = greedy_accuracy(loaded, config, tokenizer, test)
    info = {"held_out_greedy_accuracy": acc, "held_out_problems": n,
            "held_out_greedy_accuracy_by_ops": per_ops, "parameters": n_params,
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "train_size": args.train_size, "box_short": args.box_short, "box_long": args.box_long, "final_loss": float(loss),
            "seconds": round(time.time() - t0, 1), "history": history}
    with open(os.path.join(args.out, "pretraining.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}))


if __name__ == "__main__":
    main()
