"""Attention kernels for chunked prefill against a fixed-shape KV cache.

Self-contained: imports nothing from jaxchunk. The individual backends live in
their modules (blockwise_attention, flash_attention, decode_attention); they are
deliberately not re-exported here so `import pallas_kernels.flash_attention`
still names the module. (`attention` and `attention_reference` do shadow their
modules; use `from pallas_kernels.attention import BACKENDS` style imports.)
Each op (attention.py, quant_matmul.py) is a table of backends, `BACKENDS` (see backends.py).
"""
from pallas_kernels.common import BlockSizes
from pallas_kernels.attention import attention
from pallas_kernels.attention_reference import attention_reference

__all__ = ["attention", "attention_reference", "BlockSizes"]
