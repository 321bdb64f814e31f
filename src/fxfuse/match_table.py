"""Matches per pass and per rewrite, counted so that FX-graph-cache hits still report them.

Counts live in Inductor's own counter table under keys ``fxfuse|<pass>|<rewrite>``.
Inductor records how much each compile moved that table and, when it later serves
the same graph from its FX graph cache without running any pass, adds the recorded
amounts again. So the table reports the matches that the graphs in use contain,
whether this process ran the passes or a cache did.
"""

from __future__ import annotations

from . import compat

_PREFIX = "fxfuse|"


def record(pass_name: str, rewrite_name: str, n: int = 1) -> None:
    """Count ``n`` replacements of ``rewrite_name`` by ``pass_name``."""
    compat.inductor_counters()[f"{_PREFIX}{pass_name}|{rewrite_name}"] += n


def match_table() -> dict[str, dict[str, int]]:
    """Matches so far in this process, per pass and per rewrite.

    Example:
        >>> compiled(x)
        >>> fxfuse.match_table()
        {'rms_quant_fusion': {'RmsNormStaticFp8Quant': 2}}
    """
    table: dict[str, dict[str, int]] = {}
    for key, n in sorted(compat.inductor_counters().items()):
        if key.startswith(_PREFIX) and n:
            pass_name, rewrite_name = key[len(_PREFIX) :].split("|", 1)
            table.setdefault(pass_name, {})[rewrite_name] = n
    return table


def reset_match_table() -> None:
    """Forget all counts (e.g. between two compiles whose matches you want apart).

    Example:
        >>> fxfuse.reset_match_table(); fxfuse.match_table()
        {}
    """
    counters = compat.inductor_counters()
    for key in [k for k in counters if k.startswith(_PREFIX)]:
        del counters[key]
