"""Integer checks of the API's arguments: NumPy integers count, bools and floats do not (a float would be
truncated and a bool taken as 0 or 1 without a word)."""
from __future__ import annotations

import numbers
from typing import Iterable


def is_integer(v) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def integer_ids(values: Iterable, what: str, error: type[ValueError] = ValueError) -> tuple[int, ...]:
    """`values` (token ids) as Python ints; `error` names `what` and the first value that is not an integer."""
    try:
        ids = tuple(values)
    except TypeError:  # None, a number: not a sequence
        raise error(f"{what}: token ids must be a sequence of integers, got {values!r}") from None
    for i, t in enumerate(ids):
        if not is_integer(t):
            raise error(f"{what}: token ids must be integers, got {t!r} at position {i}")
    return tuple(int(t) for t in ids)
