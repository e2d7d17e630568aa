"""x W for the decode path on CPU as a C++ kernel (an XLA FFI custom call) over W packed in
column panels: `inference_weights(matmul="cpu-kernel")` packs each kernel once, and every
prefill and decode step multiplies by the packed copy.

XLA's CPU dot repacks its right operand on every call. A decode step multiplies a few rows (the
slots) by every weight matrix of the model, the same arrays at every step, and at 16 rows that
repacking costs about as much as the multiply: on the CPU benchmark model (hidden 256, 4 layers,
vocabulary 8192, batch 16) the sampler's decode loop took 272 -> 159 ms with the packed kernel
(one process, alternating; the same tokens; 2-core Zen 3 EPYC, 2026-12-03;
`experiments/NOTES_sampling.md`, "C++ kernels for the decode path"). The kernel
(`csrc/panel_matmul.cc`) keeps a block of rows' 16 output columns in registers over the whole
sum and reads each panel's rows contiguously; panels are split over XLA's CPU thread pool.
Float32 only.

    w = cpu_matmul.pack(kernel)          # [in, out] -> Panels
    y = cpu_matmul.matmul(x, w)          # x [..., in] -> [..., out], float32

Both raise a clear error where the kernels are not available (`cpu_kernels.require`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from arca_jax.qwen3 import cpu_kernels

PANEL = 16  # columns per panel
_TARGET = "arca_panel_matmul"
_PACK = "arca_pack_panels"
_PACK_T = "arca_pack_panels_transposed"


@flax.struct.dataclass
class Panels:
    """An [in, out] kernel in column panels: data [C, in, 16] float32 (C = ceil(out / 16);
    panel c holds columns 16 c .. 16 c + 15, zeros past `columns`), columns = out (static)."""

    data: jax.Array
    columns: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self):
        """(in, out), the kernel's shape."""
        return (self.data.shape[1], self.columns)

    @property
    def dtype(self):
        return self.data.dtype


def pack(w: jax.Array, transposed: bool = False) -> Panels:
    """w [in, out] (or [out, in] when `transposed`, e.g. a tied embedding [V, D] as the head)
    -> `Panels` (float32), by the kernel library (XLA's transpose into this layout took 6 of the
    CPU demo's 10 ms of weight preparation; from the [V, D] embedding 3.8 ms, the kernel 0.9)."""
    cpu_kernels.require("cpu_matmul.pack")
    out, n_in = w.shape if transposed else w.shape[::-1]
    C = -(-out // PANEL)
    data = jax.ffi.ffi_call(_PACK_T if transposed else _PACK,
                            jax.ShapeDtypeStruct((C, n_in, PANEL), jnp.float32),
                            vmap_method="sequential")(w.astype(jnp.float32))
    return Panels(data=data, columns=out)


def matmul(x: jax.Array, w: Panels) -> jax.Array:
    """x [..., in] @ the packed kernel -> [..., out] float32 (x is cast to float32; products and
    sums in float32, summed over `in` in order)."""
    cpu_kernels.require("cpu_matmul.matmul")
    *lead, n_in = x.shape
    if n_in != w.shape[0]:
        raise ValueError(f"matmul: x has {n_in} columns, the kernel {w.shape[0]} rows")
    M = 1
    for d in lead:
        M *= d
    y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((M, w.columns), jnp.float32),
                         vmap_method="sequential")(x.reshape(M, n_in).astype(jnp.float32), w.data)
    return y.reshape(*lead, w.columns)
