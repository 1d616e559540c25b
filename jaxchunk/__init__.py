"""jaxchunk: chunked prefill for Llama models in JAX / Flax / Pallas (exllamav2's design, measured).

The curated surface; everything else is in its module (see the README's layout table):

    model = jaxchunk.load("smollm2-135m")                 # a `Model`
    model.generate("The capital of France is", max_new_tokens=16, return_ids=True)  # a GenerationResult
    model.warmup(batch_sizes=(1,), chunk_sizes=(256,))
    gen = jaxchunk.Generator(model, token_budget=256)       # continuous batching over a paged cache
    gen.generate(["Hi", "Hello"], max_new_tokens=16)        # or gen.enqueue(jaxchunk.Job(...)); gen.iterate()
    with jaxchunk.compile_guard():                         # raises if anything compiles in here
        model.generate(...)
"""
from jaxchunk.api import GenerationResult, Model, load
from jaxchunk.errors import CompileAfterWarmupError, JaxchunkError


def __getattr__(name):
    """`Generator` / `Job` (jaxchunk.generator), imported on use: `import jaxchunk` stays free of JAX."""
    if name in ("Generator", "Job"):
        from jaxchunk import generator
        return getattr(generator, name)
    raise AttributeError(f"module 'jaxchunk' has no attribute {name!r}")


def compile_guard():
    """`jaxchunk.steps.compile_guard` (imported on use: `import jaxchunk` stays free of JAX)."""
    from jaxchunk.steps import compile_guard as guard
    return guard()


__all__ = ["load", "Model", "GenerationResult", "Generator", "Job", "compile_guard", "CompileAfterWarmupError",
           "JaxchunkError"]
