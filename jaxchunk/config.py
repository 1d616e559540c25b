"""Frozen configuration dataclasses. Everything here is hashable so it can be a static jit argument."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling ("rope_type": "llama3" in HF configs).

    `kind` is "llama3" or "linear". For "linear" only `factor` is used.
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


ARCHITECTURES = ("llama", "gemma3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-architecture model, or of a Llama variant (Gemma 3). Read from
    GGUF metadata or HF config.json; nothing is hard-coded for a particular checkpoint.

    The fields after `eos_token_id` describe what a variant changes; their defaults are Llama's,
    so a Llama config never sets them:

    architecture:      "llama" or "gemma3" (GGUF `general.architecture`): names the params keys.
    layer_windows:     per layer, the sliding window (key j visible to query p iff
                       p - window < j <= p) or None for global attention; None: every layer global.
    local_rope_theta:  RoPE base of the sliding-window layers (Gemma 3: 10000, global 1e6); None:
                       rope_theta everywhere.
    qk_norm:           RMSNorm over head_dim of q and k, after the projections, before RoPE.
    sandwich_norms:    RMSNorm of the attention and of the MLP output before each residual add.
    mlp_activation:    "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh-approximated GELU).
    embed_scale:       embeddings multiplied by this (Gemma: sqrt(hidden_size)); None: 1.
    query_pre_attn_scalar: attention scale 1 / sqrt(this); None: 1 / sqrt(head_dim).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_scaling: Optional[RopeScaling] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    architecture: str = "llama"
    layer_windows: Optional[tuple[Optional[int], ...]] = None
    local_rope_theta: Optional[float] = None
    qk_norm: bool = False
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    embed_scale: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"LlamaConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"LlamaConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, "
                             f"got {self.mlp_activation!r}")
        if self.layer_windows is not None:
            windows = tuple(self.layer_windows)
            object.__setattr__(self, "layer_windows", windows)  # a list would not be hashable
            if len(windows) != self.num_layers:
                raise ValueError(f"LlamaConfig.layer_windows has {len(windows)} entries for "
                                 f"{self.num_layers} layers")
            bad = [w for w in windows if w is not None and (not isinstance(w, int) or w < 1)]
            if bad:
                raise ValueError(f"LlamaConfig.layer_windows entries must be None or ints >= 1, got {bad[0]!r}")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of `layer` (None: global attention)."""
        return None if self.layer_windows is None else self.layer_windows[layer]

    @property
    def windows(self) -> tuple[Optional[int], ...]:
        """The distinct windows of the layers, in order of first use (Gemma 3: (512, None);
        Llama: (None,)). Attention is compiled once per entry."""
        return tuple(dict.fromkeys(self.layer_windows or (None,)))

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of `layer`: local_rope_theta on sliding-window layers if set, else rope_theta."""
        if self.local_rope_theta is not None and self.layer_window(layer) is not None:
            return self.local_rope_theta
        return self.rope_theta

    @property
    def sm_scale(self) -> Optional[float]:
        """The attention's softmax scale; None: the backends' default 1 / sqrt(head_dim)."""
        return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5
