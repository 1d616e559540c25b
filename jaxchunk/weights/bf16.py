"""bfloat16 weight matrices held as their raw uint16 bits (what `jaxchunk.load(weights="bf16")` gives).

Why not plain bf16 arrays: XLA:CPU computes a bf16 dot with few rows (decode) in f32, and when the
stacked [layers, ...] bf16 weights enter the model's layer scan as bf16 it hoists that conversion out
of the loop, converting every layer's weights to f32 on every step (SmolLM2: 552 MB of temporaries,
155 ms a decode step). Held as uint16 the loop carries them untouched and each layer is
bitcast back to bf16 inside its own iteration (14 MB of temporaries, 13 ms for the 30 layers). The
bitcast has to happen at load: done inside the jitted step, XLA materialises it as a copy.

`BF16Weight` stands in for a bf16 array anywhere in the params pytree (a layer matrix, the
embedding, the LM head); `jaxchunk.model` calls `.value()` where it uses one. The bits are the
bf16 array's own, so results are identical to plain bf16 params.

Inference only: bits carry no gradient (jax.grad with respect to a uint16 leaf raises). Train on
`unpack_bf16(params)` or f32 params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Leaves packed by pack_bf16: the matrices (norm vectors stay bf16: tiny, and used in f32 anyway).
PACKED_LAYER_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
PACKED_TOP_KEYS = ("embed", "lm_head")


@struct.dataclass
class BF16Weight:
    """A bfloat16 array held as its uint16 bits, same shape."""

    bits: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def value(self) -> jax.Array:
        """The bf16 array (a bitcast: no data moves inside a jitted computation)."""
        return jax.lax.bitcast_convert_type(self.bits, jnp.bfloat16)

    def __getitem__(self, index) -> "BF16Weight":
        return BF16Weight(self.bits[index])


def _to_bits(a) -> jax.Array:
    if a.dtype != jnp.bfloat16:
        raise ValueError(f"pack_bf16 takes bfloat16 weights, got {a.dtype}")
    if isinstance(a, np.ndarray):
        return a.view(np.uint16)
    return jax.lax.bitcast_convert_type(a, jnp.uint16)


def pack_bf16(params: dict) -> dict:
    """bf16 params -> the same params with the matrices and embedding as BF16Weight."""
    layers = {k: BF16Weight(_to_bits(v)) if k in PACKED_LAYER_KEYS else v for k, v in params["layers"].items()}
    top = {k: BF16Weight(_to_bits(v)) for k, v in params.items() if k in PACKED_TOP_KEYS}
    return dict(params, **top, layers=layers)


def unpack_bf16(params: dict) -> dict:
    """Inverse of pack_bf16: every BF16Weight back to a bf16 array."""
    return jax.tree.map(lambda w: w.value() if isinstance(w, BF16Weight) else w, params,
                        is_leaf=lambda w: isinstance(w, BF16Weight))


def as_array(w):
    """w as an array: a BF16Weight's bf16 value, anything else unchanged."""
    return w.value() if isinstance(w, BF16Weight) else w


def dynamic_slice_in_dim(w, start, size: int, axis: int):
    """`lax.dynamic_slice_in_dim` for an array or a BF16Weight (sliced as bits, still packed)."""
    if isinstance(w, BF16Weight):
        return BF16Weight(jax.lax.dynamic_slice_in_dim(w.bits, start, size, axis))
    return jax.lax.dynamic_slice_in_dim(w, start, size, axis)
