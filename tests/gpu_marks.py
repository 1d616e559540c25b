"""The marks of a GPU-only test file: skipped, with the reason shown, wherever jax has no GPU."""
import jax
import pytest


def gpu_only(twin_file: str) -> list:
    """pytestmark for a file whose cases also run in interpret mode in `twin_file`."""
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(
            jax.default_backend() != "gpu",
            reason=f"needs a GPU: jax.default_backend() is {jax.default_backend()!r}; "
                   f"the same cases run in interpret mode in {twin_file}"),
    ]
