from jaxchunk.api import Model, load

__all__ = ["load", "Model"]
