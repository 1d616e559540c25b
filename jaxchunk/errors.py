"""Errors raised by jaxchunk. Every failure a user can cause surfaces as one of these,
with a message that names the file / tensor / argument and the problem."""


class JaxchunkError(Exception):
    """Base class of every error jaxchunk raises on purpose."""


class ModelFileError(JaxchunkError, ValueError):
    """A model file is missing, truncated, of the wrong type, or inconsistent with its config."""


class UnsupportedError(JaxchunkError, NotImplementedError):
    """A valid file uses something jaxchunk does not implement (quant type, architecture...)."""


class FetchError(JaxchunkError, RuntimeError):
    """The reference model could not be fetched or failed verification."""


class TokenizerError(JaxchunkError, ValueError):
    """A tokenizer could not be built from the given files / metadata."""


class InputError(JaxchunkError, ValueError):
    """Bad arguments: a prompt longer than the cache, a chunk size out of range, wrong token dtype..."""


class CompileAfterWarmupError(JaxchunkError, RuntimeError):
    """Something compiled inside `jaxchunk.compile_guard()`: a shape that was not warmed up."""
