"""One op, several backends behind the op's own signature (the tokamax pattern).

An op module (attention.py, quant_matmul.py) lists its implementations as `Backend` entries in a
table, `BACKENDS` (name -> Backend, in the order `impl="auto"` tries them), and dispatches with
`choose_backend`. Each entry says what it can take (`supports`), so a caller or a test can ask
before calling, and an explicit `impl=NAME` that cannot take a call fails with that reason instead
of somewhere deep in a lowering.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    name: what `impl=` calls it.
    fn: the implementation, called with the op's own arguments (everything but `impl`).
    supports: the same arguments -> None if `fn` takes this call, else a short reason why not
        (shapes, dtypes, cache format, platform, a native build that failed, ...). It only looks
        at shapes, dtypes and static arguments, so it works on tracers and ShapeDtypeStructs.
    doc: one line: what it is and what it takes.
    auto_platforms: the platforms (`jax.default_backend()`) on which impl="auto" may choose it;
        None: every platform; (): never (only as an explicit impl=NAME).
    """

    name: str
    fn: Callable
    supports: Callable[..., str | None]
    doc: str
    auto_platforms: tuple[str, ...] | None = None

    def chosen_by_auto_on(self, platform: str) -> bool:
        return self.auto_platforms is None or platform in self.auto_platforms


def supports_everything(*args, **kwargs) -> None:
    """`supports` of a backend that takes every valid call."""
    del args, kwargs


def impl_names(backends: Mapping[str, Backend]) -> tuple[str, ...]:
    """The valid `impl=` values: "auto" and the backends' names, in table order."""
    return (AUTO, *backends)


def choose_backend(backends: Mapping[str, Backend], impl: str, *args, **kwargs) -> Backend:
    """The backend for one call of an op with arguments (*args, **kwargs).

    impl "auto": the first entry, in table order, that `auto_platforms` allows on
    jax.default_backend() and whose `supports` is None. impl=NAME: that entry; ValueError naming
    it and its reason when it does not support the call, or listing the names when there is none.
    """
    if impl == AUTO:
        platform = jax.default_backend()
        reasons = []
        for backend in backends.values():
            if not backend.chosen_by_auto_on(platform):
                continue
            why = backend.supports(*args, **kwargs)
            if why is None:
                return backend
            reasons.append(f"{backend.name}: {why}")
        raise ValueError(f"no backend takes this call on {platform}: {'; '.join(reasons)}")
    backend = backends.get(impl)
    if backend is None:
        raise ValueError(f"impl must be one of {impl_names(backends)}, got {impl!r}")
    why = backend.supports(*args, **kwargs)
    if why is not None:
        raise ValueError(f"impl={impl!r} cannot take this call: {why}")
    return backend
