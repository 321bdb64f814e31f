"""Helpers every module of :mod:`fxfuse.attention` shares: the error prefix and two small checks."""

from __future__ import annotations

from typing import Sequence

#: Every error of the attention runtime starts with this, as the op's own errors do.
_PREFIX = "fxfuse.attention"


def _is_int(v: object) -> bool:
    # bool is an int subclass; a head count of True is a bug, not 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"
