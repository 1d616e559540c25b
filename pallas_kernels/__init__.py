"""Kernels for chunked prefill against a fixed-shape KV cache, each op a table of backends.

Self-contained: imports nothing from jaxchunk. Import what you need from its module (this package
imports nothing itself, so `import pallas_kernels.cache_dir` stays free of JAX):

    from pallas_kernels.attention import attention, BACKENDS     # the attention op and its backends
    from pallas_kernels.attention_reference import attention_reference
    from pallas_kernels.common import BlockSizes
    from pallas_kernels.quant_matmul import quant_matmul        # x @ dequant(W)
    from pallas_kernels.kv_quant import kv_quant_spec, kv_quant_pair  # KV cache formats (one, or keys / values apart)

Each op (attention.py, quant_matmul.py) is a table of `backends.Backend` entries, `BACKENDS`.
"""
