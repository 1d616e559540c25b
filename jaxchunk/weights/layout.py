"""The params pytree's layer keys (the layout itself is documented in `jaxchunk.weights`)."""

PARAM_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
"""The leaves of params["layers"] of a Llama, each stacked over layers on axis 0."""

QK_NORM_KEYS = ("q_norm", "k_norm")
"""RMSNorm weights [L, head_dim] of q and k (config.qk_norm)."""

SANDWICH_NORM_KEYS = ("post_attn_norm", "post_mlp_norm")
"""RMSNorm weights [L, hidden] of the attention and MLP outputs (config.sandwich_norms)."""


def layer_keys(config) -> tuple[str, ...]:
    """The leaves of params["layers"] for `config` (a LlamaConfig): PARAM_LAYER_KEYS, plus the
    norms a variant adds (Gemma 3: both)."""
    return (PARAM_LAYER_KEYS + (QK_NORM_KEYS if config.qk_norm else ())
            + (SANDWICH_NORM_KEYS if config.sandwich_norms else ()))
