"""Every error qkv raises on purpose.

Each class also derives from the built-in exception a caller would expect (``ValueError`` for bad
values, ``TypeError`` for bad dtypes, ``KeyError``-free lookups), so ``except ValueError`` keeps
working for code that does not know qkv.
"""

from __future__ import annotations


class QKVError(Exception):
    """Base class of every error raised by qkv."""


class ShapeError(QKVError, ValueError):
    """A tensor has the wrong rank or shape for the operation (names the tensor and the shapes)."""


class DTypeError(QKVError, TypeError):
    """A tensor has an integer or otherwise unsupported dtype."""


class NonFiniteError(QKVError, ValueError):
    """A tensor holds NaN or Inf values."""


class ValueRangeError(QKVError, ValueError):
    """A tensor holds finite values too large to process without overflow (above 2**120)."""


class DeviceError(QKVError, ValueError):
    """Tensors that must live on one device do not."""


class ConfigError(QKVError, ValueError):
    """A component or policy was configured with invalid or incompatible parameters."""


class UnknownComponentError(ConfigError):
    """A registry lookup used a name that is not registered; the message lists the valid names."""


class SpecError(ConfigError):
    """A spec string could not be parsed."""


class CorruptDataError(QKVError, ValueError):
    """A stored compressed object is truncated, tampered with or inconsistent."""


class BackendError(QKVError, ValueError):
    """A kernel backend was requested that does not exist or cannot run here."""


class NoBoundError(QKVError, ValueError):
    """An error bound was asked of a policy with a component that declares none (the message names
    the component)."""


class BoundViolation(QKVError, AssertionError):
    """A reconstruction is farther from its original than the bound its compressed data reports."""


class CacheError(QKVError, ValueError):
    """A streaming-cache operation does not fit the cache's state (reading a layer that holds
    nothing, evicting more than it holds, a slice write that is neither an append, a rewrite of the
    newest chunk nor an eviction, or a saved cache that does not match its files)."""


class GradientError(QKVError, RuntimeError):
    """A tensor that requires grad would be stored where no gradient flows back (the cache keeps
    detached, possibly compressed copies): storing it would silently drop its gradient."""


# Longest repr of an input an error message quotes: a message names the problem, it does not echo
# a 1 MB spec back.
SHOWN = 80


def shown(value: object) -> str:
    """``repr(value)`` for an error message, cut to :data:`SHOWN` characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= SHOWN:
        return text
    return f"{text[: SHOWN - 20]}...{text[-10:]} ({len(text):,} characters)"
