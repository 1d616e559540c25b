"""The names of the ways a model's weights can be held and computed with (one definition, used by
`jaxchunk.load`, the command line and the experiments). Importing this is free: no NumPy, no JAX."""

DTYPES = ("f32", "bf16")
"""The dtypes a model computes in (activations, norms, float weights)."""

WEIGHT_MODES = ("dequantized", "f32", "bf16", "q4", "q4_q8")
"""How the weight matrices are held: "dequantized" to the compute dtype, "f32" / "bf16" (that
dtype, which the compute dtype must then be), or quantized (QUANTIZED_MODES)."""

QUANTIZED_MODES = ("q4", "q4_q8")
"""Weight modes that keep a GGUF's quant blocks, k-quants too (QuantizedWeight); "q4_q8" also
rounds each matrix's input to 8 bits per 32-block (llama.cpp's arithmetic)."""
