"""Checks of integer and float settings, shared by every module that takes them.

Each check returns the value as a plain ``int`` or ``float`` or raises ``error``
(a ``ValueError`` subclass of :mod:`icbs_opt.errors`) with one message that names
the setting and shows the value: ``"block_size must be an integer >= 2, got 0"``.
Strings are parsed (the command line passes them), bools are never numbers, and an
integer given as a float (``2.5``, ``1e23``, ``nan``) is refused, not truncated.

Example:
    >>> check_int("3", "steps", minimum=0)
    3
    >>> check_float(0.5, "density", above=0, below=1)
    0.5
    >>> check_int(2.5, "k")
    Traceback (most recent call last):
    ...
    ValueError: k must be an integer, got 2.5
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Largest integer a setting may take: a C ``int64`` (the native core's type).
INT_MAX = 2**63 - 1


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy integers too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number_text(value: float) -> str:
    """An int in full (``2147483647``, not ``2.14748e+09``), a float as ``:g``."""
    return str(int(value)) if is_integer(value) else f"{value:g}"


def _bounds_text(
    minimum: float | None,
    maximum: float | None,
    above: float | None = None,
    below: float | None = None,
) -> str:
    low = f">= {_number_text(minimum)}" if minimum is not None else None
    low = f"> {_number_text(above)}" if above is not None else low
    high = f"<= {_number_text(maximum)}" if maximum is not None else None
    high = f"< {_number_text(below)}" if below is not None else high
    if low and high:
        left = "[" if minimum is not None else "("
        right = "]" if maximum is not None else ")"
        lo = minimum if minimum is not None else above
        hi = maximum if maximum is not None else below
        return f" in {left}{_number_text(lo)}, {_number_text(hi)}{right}"
    return f" {low or high}" if (low or high) else ""


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[ValueError] = ValueError,
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Args:
        value: An int, a numpy integer or a string of one (``"12"``).
        name: The setting's name, quoted in the message.
        minimum: Smallest allowed value (None: no bound).
        maximum: Largest allowed value (None: :data:`INT_MAX`).
        error: The exception type raised.

    Raises:
        error: If the value is not an integer or is out of range.
    """
    hi = INT_MAX if maximum is None else maximum
    message = f"{name} must be an integer{_bounds_text(minimum, maximum)}"
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise error(f"{message}, got {value!r}") from None
    if not is_integer(number):
        raise error(f"{message}, got {value!r}")
    number = int(number)
    if (minimum is not None and number < minimum) or number > hi:
        if number > hi and maximum is None:
            message = f"{name} must be an integer <= {INT_MAX}"
        raise error(f"{message}, got {value!r}")
    return number


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    error: type[ValueError] = ValueError,
) -> float:
    """``value`` as a finite ``float`` within the given bounds.

    Args:
        value: A real number or a string of one; ints are accepted.
        name: The setting's name, quoted in the message.
        minimum: Inclusive lower bound (None: none).
        maximum: Inclusive upper bound (None: none).
        above: Exclusive lower bound (None: none).
        below: Exclusive upper bound (None: none).
        error: The exception type raised.

    Raises:
        error: If the value is not a finite number or is out of range.
    """
    bounds = _bounds_text(minimum, maximum, above, below)
    message = f"{name} must be a finite number{bounds}"
    if isinstance(value, bool):
        raise error(f"{message}, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{message}, got {value!r}") from None
    if (
        not math.isfinite(number)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
        or (above is not None and number <= above)
        or (below is not None and number >= below)
    ):
        raise error(f"{message}, got {value!r}")
    return number
