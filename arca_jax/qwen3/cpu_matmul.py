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
    w = cpu_matmul.pack_parts([(q, i), (k, i), (v, i)], scale=(norm, i))  # a fused kernel
    y = cpu_matmul.matmul(x, w)          # x [..., in] -> [..., out], float32

Both raise a clear error where the kernels are not available (`cpu_kernels.require`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from arca_jax.qwen3 import cpu_kernels

PANEL = 16  # columns per panel
_TARGET = "arca_panel_matmul"
_PACK = "arca_pack_panels"
_PACK_T = "arca_pack_panels_transposed"
_PACK_PARTS = "arca_pack_panels_parts"


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


def pack_parts(parts: Sequence[Tuple[jax.Array, int]], scale: Optional[Tuple[jax.Array, int]] = None
               ) -> Panels:
    """One layer's fused kernel packed in one pass: parts [(stack [L_i, in, out_i], layer i)]
    side by side, each row times scale[0][scale[1]] ([L_s, in]) when given -> `Panels` of
    diag(scale) [W_1 | W_2 | ...] ([in, sum out_i]); float32 (other dtypes are cast first, one
    layer at a time). The same values as slicing, concatenating, scaling and `pack`, without
    those passes over the weights."""
    cpu_kernels.require("cpu_matmul.pack_parts")
    f32 = jnp.float32
    arrays, layers = [], []
    for stack, layer in parts:
        if stack.dtype != f32:  # cast the one layer, not the stack
            stack, layer = stack[layer][None].astype(f32), 0
        arrays.append(stack)
        layers.append(int(layer))
    n_in = arrays[0].shape[1]
    columns = sum(a.shape[2] for a in arrays)
    scale_layer = -1
    if scale is not None:
        arrays.append(scale[0].astype(f32))
        scale_layer = int(scale[1])
    data = jax.ffi.ffi_call(_PACK_PARTS,
                            jax.ShapeDtypeStruct((-(-columns // PANEL), n_in, PANEL), f32),
                            vmap_method="sequential")(
        *arrays, layers=np.asarray(layers, np.int64), scale_layer=np.int64(scale_layer))
    return Panels(data=data, columns=columns)


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
