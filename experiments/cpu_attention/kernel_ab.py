"""The CPU attention kernel against its first version, in C++ on one thread, one layer of the
demo's packed batch (lines of 4 T, as the trainer packs for the kernel). Not a test: times only
(tests/model/test_cpu_attention.py checks the library kernel's values against
`masked_attention`); it prints the two versions' largest relative difference.

    python experiments/cpu_attention/kernel_ab.py [--rounds 15] [--line-width 4]

Writes q, k, v, dout (random normal) and the packed batch's visibility to a temporary
directory, builds `kernel_ab.cc` (which includes `packed_attention_v1.cc` and the library's
`arca_jax/qwen3/csrc/packed_attention.cc`) with the library's compiler flags, and runs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax.qwen3 import cpu_kernels  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--line-width", type=int, default=4)
    args = ap.parse_args()

    import profile_update as pu
    from arca_jax import qwen3
    from arca_jax.config import ModelConfig
    from arca_jax.trainer.programs import StepPrograms

    batch, _ = pu.demo_batch(mean_len=43, prompt_tokens=(14, 26))
    pb = StepPrograms(None, rows=batch.input_ids.shape[0], share_prompts=True,
                      line_width=args.line_width).pack(batch)
    seg, pre = np.asarray(pb.packing.segments), np.asarray(pb.packing.prefix)
    L, W = seg.shape
    vis = (np.tril(np.ones((W, W), bool))[None] & (seg[:, None, :] > 0)
           & ((seg[:, :, None] == seg[:, None, :]) | (pre[:, :, None] == seg[:, None, :])))
    config = qwen3.Qwen3Config.from_hf(ModelConfig().resolved_path())
    K, G, H = config.num_key_value_heads, config.num_groups, config.head_dim
    print(f"packed batch: {L} lines of {W}; visible pairs {vis.sum()} of {L * W * W}; "
          f"K {K}, G {G}, H {H}")
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        for name, shape in (("q", (L, K, G, W, H)), ("k", (L, K, W, H)), ("v", (L, K, W, H)),
                            ("dout", (L, K, G, W, H))):
            rng.normal(size=shape).astype(np.float32).tofile(os.path.join(d, name + ".bin"))
        vis.astype(np.uint8).tofile(os.path.join(d, "visible.bin"))
        exe = os.path.join(d, "kernel_ab")
        flags = [f for f in cpu_kernels.FLAGS if f not in ("-shared", "-fPIC")]
        subprocess.run([os.environ.get("CXX") or "g++", *flags, f"-I{jax.ffi.include_dir()}",
                        os.path.join(HERE, "kernel_ab.cc"), "-o", exe], check=True)
        subprocess.run([exe, d, str(L), str(K), str(G), str(W), str(W), str(H),
                        str(args.rounds)], check=True)
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
