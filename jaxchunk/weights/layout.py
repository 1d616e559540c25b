"""The params pytree's layer keys (the layout itself is documented in `jaxchunk.weights`)."""

PARAM_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
"""The leaves of params["layers"], each stacked over layers on axis 0."""
