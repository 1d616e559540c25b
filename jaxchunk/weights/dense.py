"""Plain f32 / bf16 weight matrices multiplied by the native CPU gemv at decode rows.

XLA:CPU's dot at one row reads a dense weight at a third (f32) to a quarter (bf16) of the host's
read bandwidth, and unsteadily: its slow samples were 8-12x below the host's slowest bandwidth
sample (`experiments/roofline.py`'s decode dots), which was the spread of dense-weight decode
(issue 20). `pallas_kernels.native_cpu.dense_gemv_cpu` reads each block of W once, sequentially.

A custom call takes whole buffers: a layer sliced out of the stacked [layers, in, out] weights by the
layer scan would first be copied (read and written once more for one read). So for decode steps
`jaxchunk.model.scan_layers` hands the matrices over whole as `DenseLayer(stack, layer)`, as it
does for `QuantizedWeight.at_layer`, and the kernel reads that layer in place.

`dense_linear` has a VJP (the same products in XLA), so a chunked-training step with few rows
still differentiates; its weight cotangent is the whole stack's (zero but for the layer).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxchunk.weights.bf16 import BF16Weight
from pallas_kernels import native_cpu


def gemv_storage(w) -> jax.Array | None:
    """The array the native gemv reads for w (an f32 array, or a BF16Weight's uint16 bits), or None
    for any other weight (plain bf16 / f16 arrays, quantized weights)."""
    if isinstance(w, BF16Weight):
        return w.bits
    if isinstance(w, (jax.Array, np.ndarray)) and w.dtype == jnp.float32:
        return w
    return None


@struct.dataclass
class DenseLayer:
    """Layer `layer` (traced) of a stacked dense weight: `stack` is an f32 array or a BF16Weight
    [layers, in, out], kept whole; this stands for stack[layer] [in, out]."""

    stack: Any
    layer: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self):
        return self.stack.dtype

    def value(self) -> jax.Array:
        """The layer as an array (a dynamic slice: for the XLA path)."""
        storage = jax.lax.dynamic_index_in_dim(gemv_storage(self.stack), self.layer, keepdims=False)
        return _as_float(storage)


def _as_float(storage: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(storage, jnp.bfloat16) if storage.dtype == jnp.uint16 else storage


def dense_linear(x: jax.Array, w, *, transposed: bool = False) -> jax.Array:
    """x [..., in] @ W -> [..., out] in x.dtype by the native gemv (products and sums in f32).

    w: a DenseLayer, an f32 array or a BF16Weight (2-D); W is w, or with `transposed` w.T (a tied
    embedding [vocab, hidden] as the LM head). Exactly jnp.einsum(x, W.astype(x.dtype),
    preferred_element_type=float32) up to the order of the sums, for the pairs the callers
    allow (f32 x and f32 W; f32 or bf16 x and bf16 W)."""
    if isinstance(w, DenseLayer):
        storage, layer = gemv_storage(w.stack), w.layer
    else:
        storage, layer = gemv_storage(w)[None], jnp.zeros((), jnp.int32)
    return _gemv(x, storage, layer, transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gemv(x, storage, layer, transposed):
    return native_cpu.dense_gemv_cpu(x, storage, layer=layer, transposed=transposed)


def _gemv_fwd(x, storage, layer, transposed):
    return _gemv(x, storage, layer, transposed), (x, storage, layer)


def _gemv_bwd(transposed, residuals, g):
    x, storage, layer = residuals
    w = _as_float(jax.lax.dynamic_index_in_dim(storage, layer, keepdims=False)).astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    dx = jnp.einsum("...o,io->...i" if not transposed else "...o,oi->...i", g32, w).astype(x.dtype)
    layer_ct = np.zeros(layer.shape, jax.dtypes.float0)
    if storage.dtype != jnp.float32:  # bf16 bits carry no gradient (BF16Weight is inference only)
        return dx, np.zeros(storage.shape, jax.dtypes.float0), layer_ct
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    dw = x2.T @ g32.reshape(-1, g32.shape[-1])  # [in, out]
    dstack = jax.lax.dynamic_update_index_in_dim(jnp.zeros_like(storage), dw.T if transposed else dw, layer, 0)
    return dx, dstack, layer_ct


_gemv.defvjp(_gemv_fwd, _gemv_bwd)
