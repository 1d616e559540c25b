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
            # Gemma 3 only (config.qk_norm / config.sandwich_norms; `layout.layer_keys(config)`):
            "q_norm": [L, head_dim], "k_norm": [L, head_dim],     RMSNorm of q / k before RoPE
            "post_attn_norm": [L, hidden], "post_mlp_norm": [L, hidden],
        },
    }

With `load_gguf(..., quantized=True)` (weights="q4") a matrix may instead be a
`quantized.QuantizedWeight` standing for the same [.., in, out] float array (its leaves stacked over
layers the same way); a quantized "embed" stands for the LM head's [hidden, vocab], i.e. the
embedding transposed.

Entry points: `load_weights(path, dtype=, weights=)` (the one way to get params ready for the
device: read, dequantize or keep quantized, `prepare_params`), `inspect(path)` (what a checkpoint
holds, without loading it), and the mode names DTYPES / WEIGHT_MODES / QUANTIZED_MODES. Modules:
gguf_file (the GGUF container), gguf_quants (its block types decoded), gguf / safetensors (the two
formats), convert (shared assembly), quantized / bf16 (in-memory weight forms), load, inspect, modes.

`jaxchunk.load(..., dtype="bf16")` holds the bf16 matrices and embedding as `bf16.BF16Weight` (the
same values as uint16 bits, same shapes; see bf16.py for why); `bf16.unpack_bf16` undoes it.
"""


from jaxchunk.weights.inspect import CheckpointInfo, TensorGroup, TokenizerSummary, inspect
from jaxchunk.weights.layout import PARAM_LAYER_KEYS
from jaxchunk.weights.load import checkpoint_path, load_weights, numpy_dtype, prepare_params, resolve_dtype
from jaxchunk.weights.modes import DTYPES, QUANTIZED_MODES, WEIGHT_MODES

__all__ = [
    "PARAM_LAYER_KEYS", "DTYPES", "WEIGHT_MODES", "QUANTIZED_MODES", "load_weights", "prepare_params",
    "resolve_dtype", "numpy_dtype", "checkpoint_path", "inspect", "CheckpointInfo", "TensorGroup",
    "TokenizerSummary",
]
