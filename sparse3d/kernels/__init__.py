"""Backend registry: which implementation sparse ops dispatch to ("torch" always; optional fast paths).

Selection is explicit: a per-call ``backend=`` argument, else the innermost `use_backend` context, else
``"torch"``. Nothing here reads environment variables, imports optional packages or touches CUDA at import.
"""

from __future__ import annotations

import contextvars
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["available_backends", "current_backend", "resolve_backend", "use_backend", "KNOWN_BACKENDS"]

KNOWN_BACKENDS: tuple[str, ...] = ("torch", "spconv")
"""Every backend name sparse3d knows about, available or not."""

_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("sparse3d_backend", default="torch")


def _spconv_importable() -> bool:
    """True if ``spconv_triton`` or ``spconv`` is installed (checked without importing it)."""
    return any(importlib.util.find_spec(name) is not None for name in ("spconv_triton", "spconv"))


def available_backends() -> list[str]:
    """Names of the backends that can be selected in this environment.

    ``"torch"`` (the plain-PyTorch reference, CPU and CUDA) is always first. ``"spconv"`` is listed when
    ``spconv_triton`` or ``spconv`` is installed; it still needs CUDA inputs at call time.

    Returns:
        A list of backend names.
    """
    names = ["torch"]
    if _spconv_importable():
        names.append("spconv")
    return names


def resolve_backend(name: str | None = None) -> str:
    """The backend an op should use: ``name`` if given, else the current context's.

    Args:
        name: A per-call backend name, or ``None`` to use `current_backend`.

    Returns:
        A backend name from `available_backends`.

    Raises:
        ValueError: ``name`` is unknown or not available here (the message lists what is).
    """
    chosen = current_backend() if name is None else name
    if chosen not in KNOWN_BACKENDS:
        raise ValueError(
            f"backend: expected one of {list(KNOWN_BACKENDS)} (available here: {available_backends()}), "
            f"got {chosen!r}"
        )
    available = available_backends()
    if chosen not in available:
        raise ValueError(
            f"backend: {chosen!r} is not available in this environment (its package is not installed); "
            f"available backends: {available}"
        )
    return chosen


def current_backend() -> str:
    """The backend selected by the innermost `use_backend` context (``"torch"`` outside any)."""
    return _CURRENT.get()


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Selects a backend for the ops called inside the ``with`` block (thread- and task-local).

    A per-call ``backend=`` argument still wins over the context.

    Args:
        name: A name from `available_backends`.

    Yields:
        The selected name.

    Raises:
        ValueError: ``name`` is unknown or not available.

    Examples:
        >>> with use_backend("torch"):
        ...     current_backend()
        'torch'
    """
    resolve_backend(name)
    token = _CURRENT.set(name)
    try:
        yield name
    finally:
        _CURRENT.reset(token)
