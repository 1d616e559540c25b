"""Weight loaders: GGUF (llama.cpp) and safetensors (Hugging Face) into one params pytree.

The params pytree (NumPy or JAX arrays; weights as [in, out] so a layer is `x @ w`):

    params = {
        "embed":      [vocab, hidden]                 token embedding, one row per token
        "final_norm": [hidden]
        "lm_head":    [hidden, vocab]                 present only when embeddings are untied
        "layers": {                                   every leaf stacked over layers on axis 0
            "attn_norm": [L, hidden],
            "wq": [L, hidden, num_heads * head_dim],  Hugging Face (rotate-half) row order:
            "wk": [L, hidden, num_kv_heads * head_dim],   llama.cpp's Q/K permutation is undone
            "wv": [L, hidden, num_kv_heads * head_dim],
            "wo": [L, num_heads * head_dim, hidden],
            "mlp_norm": [L, hidden],
            "w_gate": [L, hidden, ffn], "w_up": [L, hidden, ffn], "w_down": [L, ffn, hidden],
        },
    }

With `load_gguf(..., quantized=True)` (weights="q4") a matrix may instead be a
`quantized.QuantizedWeight` standing for the same [.., in, out] float array (its leaves stacked over
layers the same way); a quantized "embed" stands for the LM head's [hidden, vocab], i.e. the
embedding transposed.

`jaxchunk.load(..., dtype="bf16")` holds the bf16 matrices and embedding as `bf16.BF16Weight` (the
same values as uint16 bits, same shapes; see bf16.py for why); `bf16.unpack_bf16` undoes it.
"""

PARAM_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
