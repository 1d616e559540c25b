"""jaxchunk: chunked prefill for Llama models in JAX / Flax / Pallas (exllamav2's design, measured).

The curated surface; everything else is in its module (see the README's layout table):

    model = jaxchunk.load("smollm2-135m")                 # a `Model`
    model.generate("The capital of France is", max_new_tokens=16, return_ids=True)  # a GenerationResult
    model.warmup(batch_sizes=(1,), chunk_sizes=(256,))
    with jaxchunk.compile_guard():                         # raises if anything compiles in here
        model.generate(...)
"""
from jaxchunk.api import GenerationResult, Model, load
from jaxchunk.errors import CompileAfterWarmupError, JaxchunkError


def compile_guard():
    """`jaxchunk.steps.compile_guard` (imported on use: `import jaxchunk` stays free of JAX)."""
    from jaxchunk.steps import compile_guard as guard
    return guard()


__all__ = ["load", "Model", "GenerationResult", "compile_guard", "CompileAfterWarmupError", "JaxchunkError"]
