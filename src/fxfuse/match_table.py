"""Matches and near misses per pass and per rewrite, counted so that FX-graph-cache hits
still report them.

Counts live in Inductor's own counter table under keys ``fxfuse|<pass>|<rewrite>``
(matches) and ``fxfuse-miss|<pass>|<rewrite>`` (near misses). Inductor records how much
each compile moved that table and, when it later serves the same graph from its FX
graph cache without running any pass, adds the recorded amounts again. So the tables
report what the graphs in use contain, whether this process ran the passes or a cache did.

What a compile said (the miss log, a failed replacement's warning) is kept the same way,
under ``fxfuse-said|<level>|<message>``, and said again when a cache hit replays it: a
graph served from the cache never misses without saying so.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

from . import compat

_MATCH = "fxfuse|"
_MISS = "fxfuse-miss|"
_SAID = "fxfuse-said|"
_AGAIN = " (said again: Inductor served this graph from its FX graph cache)"

log = logging.getLogger("fxfuse")


def record(pass_name: str, rewrite_name: str, n: int = 1) -> None:
    """Count ``n`` replacements of ``rewrite_name`` by ``pass_name``."""
    compat.inductor_counters()[f"{_MATCH}{pass_name}|{rewrite_name}"] += n


def record_miss(pass_name: str, rewrite_name: str, n: int = 1) -> None:
    """Count ``n`` sites of ``rewrite_name`` that ``pass_name`` left unreplaced."""
    compat.inductor_counters()[f"{_MISS}{pass_name}|{rewrite_name}"] += n


def remember(level: int, message: str) -> None:
    """Keep ``message`` with the graph being compiled: each FX-graph-cache hit that serves
    it logs it again at ``level`` (and warns again, from WARNING up). Say it now yourself.

    Example:
        >>> log.info(msg); remember(logging.INFO, msg)
    """
    compat.inductor_counters()[f"{_SAID}{level}|{message}"] += 1


def watch_cache_hits() -> None:
    """Make FX-graph-cache hits say again what their compiles said (`remember`)."""
    compat.on_cache_replay(_say_again)


def _say_again(deltas: Counter) -> None:
    for key, n in deltas.items():
        if not (key.startswith(_SAID) and n > 0):
            continue
        level, message = key[len(_SAID) :].split("|", 1)
        log.log(int(level), "%s%s", message, _AGAIN)
        if int(level) >= logging.WARNING:
            from .fusion_pass import FusionWarning

            warnings.warn(message + _AGAIN, FusionWarning, stacklevel=2)


def _table(prefix: str) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for key, n in sorted(compat.inductor_counters().items()):
        if key.startswith(prefix) and n:
            pass_name, rewrite_name = key[len(prefix) :].split("|", 1)
            table.setdefault(pass_name, {})[rewrite_name] = n
    return table


def match_table() -> dict[str, dict[str, int]]:
    """Matches so far in this process, per pass and per rewrite.

    Example:
        >>> compiled(x)
        >>> fxfuse.match_table()
        {'rms_quant_fusion': {'RmsNormStaticFp8Quant': 2}}
    """
    return _table(_MATCH)


def miss_table() -> dict[str, dict[str, int]]:
    """Near misses so far: per pass and rewrite, the sites where its chain starts (its
    anchor op) that the graphs compiled so far hold unreplaced. ``fxfuse explain`` says why.

    Example:
        >>> compiled(x)
        >>> fxfuse.miss_table()      # the final norm feeds an unquantized head
        {'rms_quant_fusion': {'FusedAddRmsNormStaticFp8Quant': 1}}
    """
    return _table(_MISS)


def reset_match_table() -> None:
    """Forget all match and miss counts (e.g. between two compiles you want apart).

    Example:
        >>> fxfuse.reset_match_table(); fxfuse.match_table(), fxfuse.miss_table()
        ({}, {})
    """
    counters = compat.inductor_counters()
    for key in [k for k in counters if k.startswith((_MATCH, _MISS, _SAID))]:
        del counters[key]
