"""Launch configs and the per-device dispatch table of the small-batch FP8 GEMM
(`fxfuse.kernels.small_gemm`). Plain Python, no Triton: the ops ask it on every call
whether the kernel applies, on machines without Triton too.

The table (``small_gemm_choices.json`` beside this module, written on the GPU by
``benchmarks/small_gemm_sweep.py --write-choices``)::

    {"devices": {"NVIDIA H100 80GB HBM3": {
        "fp8_linear": {"max_tokens": 16,                    # the kernel runs for 1..16 tokens
                       "by_shape": {"4096x14336": 32},      # per weight N x K, overrides max_tokens
                       "configs": {"4096x14336": {"1": {"block_n": 64, ...}}}},  # measured best
        "block_fp8_linear": {...}}},
     "measured": {"NVIDIA H100 80GB HBM3": "date, versions, command"}}

A device (named as ``torch.cuda.get_device_name`` names it) or op without an entry keeps
the op's other paths: nothing changes until a GPU has been measured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Optional

#: The table shipped with fxfuse.
CHOICES_PATH = pathlib.Path(__file__).with_name("small_gemm_choices.json")
#: Environment variable: another table (a path) instead of the shipped one.
CHOICES_ENV = "FXFUSE_SMALL_GEMM_CHOICES"
#: Environment variable: an int that replaces every table's ``max_tokens`` (and
#: ``by_shape``) on every CUDA device; ``0`` turns the kernel off. For measuring a model
#: with and without the kernel before a table exists.
MAX_TOKENS_ENV = "FXFUSE_SMALL_GEMM_MAX_TOKENS"
#: The largest token count the kernel is built for: a 64-row tile is its biggest.
MAX_TOKENS = 64
#: Up to this many tokens the default config of a norm epilogue runs it in the GEMM's
#: last program (``row_tail``); measured configs decide above.
ROW_TAIL_TOKENS = 2
#: The ops that can dispatch to the kernel (keys of a device's table entry).
OPS = ("fp8_linear", "block_fp8_linear")
#: Activation quants a fused form folds into the GEMM's prologue, per GEMM op.
PROLOGUES = {"fp8_linear": ("static_scaled_fp8_quant", "dynamic_per_token_fp8_quant"),
             "block_fp8_linear": ("group_fp8_quant",)}
#: Consumers a fused form folds into the GEMM's epilogue, per GEMM op.
EPILOGUES = {
    "fp8_linear": ("silu_and_mul", "silu_and_mul_static_fp8_quant", "fused_add_rms_norm",
                   "fused_add_rms_norm_static_fp8_quant"),
    "block_fp8_linear": ("silu_and_mul", "silu_and_mul_group_fp8_quant", "fused_add_rms_norm",
                         "fused_add_rms_norm_group_fp8_quant"),
}


def fused_key(prologue: str, op: str, epilogue: str) -> str:
    """How a table names a fused form of ``op``: the chain it replaces, ``>``-joined
    (``prologue`` and ``epilogue`` are op names, or ``""`` for none; not both ``""``).

    >>> fused_key("", "fp8_linear", "silu_and_mul_static_fp8_quant")
    'fp8_linear>silu_and_mul_static_fp8_quant'
    >>> fused_key("group_fp8_quant", "block_fp8_linear", "")
    'group_fp8_quant>block_fp8_linear'
    """
    if op not in OPS:
        raise ValueError(f"fused_key: unknown GEMM op {op!r}; known: {list(OPS)}")
    if prologue and prologue not in PROLOGUES[op]:
        raise ValueError(f"fused_key: {op} has no prologue {prologue!r}; known: {list(PROLOGUES[op])}")
    if epilogue and epilogue not in EPILOGUES[op]:
        raise ValueError(f"fused_key: {op} has no epilogue {epilogue!r}; known: {list(EPILOGUES[op])}")
    if not prologue and not epilogue:
        raise ValueError(f"fused_key: a fused form of {op} needs a prologue or an epilogue")
    return ">".join(part for part in (prologue, op, epilogue) if part)


def is_table_op(name: str) -> bool:
    """Whether a table may hold ``name``: one of `OPS` or a `fused_key`.

    >>> is_table_op("fp8_linear>fused_add_rms_norm"), is_table_op("fp8_linear>relu")
    (True, False)
    """
    if name in OPS:
        return True
    parts = name.split(">")
    for op in OPS:
        if op in parts:
            i = parts.index(op)
            pro, epi = parts[:i], parts[i + 1:]
            if len(pro) > 1 or len(epi) > 1:
                return False
            try:
                return fused_key(pro[0] if pro else "", op, epi[0] if epi else "") == name
            except ValueError:
                return False
    return False


@dataclasses.dataclass(frozen=True)
class SmallGemmConfig:
    """Launch parameters of `fxfuse.kernels.small_gemm.small_fp8_gemm` (the row tile,
    ``BLOCK_M``, follows from the token count: `block_m_for`).

    - ``block_n``: weight rows (output columns) per program;
    - ``block_k``: K columns per loop step (for block-scaled weights a multiple of the
      activation group size, one scaled FP8 product per group);
    - ``split_k``: programs that share one output tile, each summing a contiguous K
      range; their fp32 partial tiles are added in a fixed order by a second kernel;
    - ``num_warps``, ``num_stages``: Triton's;
    - ``swap_ab``: compute ``w_tile @ x_tile.T`` so the weight tile is the MMA's M side
      (Hopper's wgmma needs 64 rows there, which 1-64 tokens cannot give);
    - ``row_tail``: for the residual + RMSNorm epilogue of a fused form, the last GEMM
      program to finish runs it over every token row (an atomic ticket), instead of a
      second kernel: one launch less, one program's serial work more (a few rows pay).

    Example:
        >>> SmallGemmConfig(64, 256, 4, 4, 4).as_dict()["split_k"]
        4
    """

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False
    row_tail: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.row_tail:  # tables written before the field existed stay what they were
            del d["row_tail"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SmallGemmConfig":
        """The config a table stores (``as_dict``'s keys); unknown keys are an error.

        >>> SmallGemmConfig.from_dict({"block_n": 32, "block_k": 128}).split_k
        1
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"small-GEMM config: unknown keys {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def label(self) -> str:
        return (f"n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}"
                + (" swap" if self.swap_ab else "") + (" tail" if self.row_tail else ""))


def block_m_for(m: int) -> int:
    """Rows of the token tile: 16 (the smallest FP8 MMA tile), 32 or 64; fewer tokens are
    padded with masked rows.

    >>> [block_m_for(m) for m in (1, 16, 17, 64)]
    [16, 16, 32, 64]
    """
    return 16 if m <= 16 else 32 if m <= 32 else 64


def split_k_for(m: int, n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Programs per output tile, so the grid holds at least two programs per
    multiprocessor where the weight allows.

    A weight streamed at full bandwidth needs loads in flight on every multiprocessor,
    and many small programs even out their finishing times; wide layers have enough
    weight-row tiles for that (``split_k = 1``), narrow ones split K. Each split keeps at
    least two K steps (something to pipeline), and the fp32 partial tiles
    (``split_k * m * n * 4`` bytes, written, then read by the reduction) stay within half
    of the weight's bytes (they mostly stay in L2).

    >>> split_k_for(1, 4096, 4096, 64, 256, 132)   # Llama-3-8B o_proj at one token
    8
    >>> split_k_for(1, 28672, 4096, 64, 256, 132)  # gate_up: 448 row tiles already
    1
    """
    tiles_n = -(-n // block_n)
    k_steps = -(-k // block_k)
    split = 1
    while tiles_n * split < 2 * sms and k_steps // (2 * split) >= 2 and (2 * split) * m * 16 <= k:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, group_k: Optional[int] = None, sms: int = 132) -> SmallGemmConfig:
    """The config used where the table has none for this shape: a rule of thumb for
    Hopper (132 multiprocessors), to be replaced by the sweep's measurements.

    ``group_k`` is the activation group size of a block-scaled problem (None: per-tensor
    or per-token scales). Swapped operands: with the token tile as the MMA's M side (16
    or 32 rows) Triton cannot use Hopper's wgmma and falls back to fp16 ``mma.sync``,
    converting every FP8 element first (seen in the sm_90 PTX: 128 ``cvt.rn.f16x2.e4m3x2``
    per K step and thread), which competes with the weight stream; swapped, the weight
    tile is M and the FP8 operands go to wgmma as they are. Weight tiles of 64 rows (the
    token tile, which every program reads again from L2, stays at most as large); K steps
    of 256 columns up to 32 tokens (16 KiB of weight per stage), 128 at 64 tokens (the
    token tile grows, and so do registers), at least one activation group; four stages
    (80-96 KiB of shared memory: two programs per multiprocessor); `split_k_for`.

    Example:
        >>> default_config(1, 4096, 4096)
        SmallGemmConfig(block_n=64, block_k=256, split_k=8, num_warps=4, num_stages=4, swap_ab=True)
    """
    block_n = 64
    block_k = 256 if m <= 32 else 128
    if group_k is not None:
        block_k = max(block_k, group_k)
    return SmallGemmConfig(block_n, block_k, split_k_for(m, n, k, block_n, block_k, sms), 4, 4, swap_ab=True)


def default_fused_config(kind: str, m: int, n: int, k: int, group_k: Optional[int] = None,
                         out_group: Optional[int] = None, sms: int = 132) -> SmallGemmConfig:
    """`default_config` for a fused form: ``kind`` is ``"silu"`` (a gate/up weight of ``n``
    rows whose programs stream a gate tile and its up tile: K steps of 128 so four stages
    of both stay under 100 KiB, weight tiles at least one output quant group wide, the
    split counted over all ``n`` rows since that is the weight in flight; 8 warps where
    the two fp32 accumulators would hold more than 64 values a thread, which spilled at
    64 tokens x 128-row tiles in the sm_90 compile) or ``"rows"`` (the residual + norm
    epilogue: `default_config`, with the last program running the epilogue at most
    `ROW_TAIL_TOKENS` tokens: a row costs that program a few L2 round trips, about what a
    second launch costs at one or two rows).

    Example:
        >>> default_fused_config("silu", 1, 28672, 4096)
        SmallGemmConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, swap_ab=True)
    """
    if kind == "rows":
        # One program normalizes every row at the end: worth a launch at a token or two.
        return dataclasses.replace(default_config(m, n, k, group_k, sms), row_tail=m <= ROW_TAIL_TOKENS)
    if kind != "silu":
        raise ValueError(f"default_fused_config: kind must be 'silu' or 'rows', got {kind!r}")
    block_n = max(64, out_group or 0)
    block_k = max(128, group_k or 0)
    warps = 8 if 2 * block_n * block_m_for(m) > 64 * 128 else 4
    return SmallGemmConfig(block_n, block_k, split_k_for(m, n, k, block_n, block_k, sms), warps, 4, swap_ab=True)


def shared_memory_bytes(m: int, config: SmallGemmConfig) -> int:
    """Shared memory a config's pipeline takes (one buffer of the weight and token tiles
    per stage, as Triton allocates them for Hopper's wgmma); what a multiprocessor has
    (227 KiB on Hopper) caps it, and half of that fits two programs.

    >>> shared_memory_bytes(1, default_config(1, 4096, 4096))
    81920
    """
    return config.num_stages * (config.block_n + block_m_for(m)) * config.block_k


def shape_key(n: int, k: int) -> str:
    """How tables name a weight shape: ``"NxK"`` (output x input features).

    >>> shape_key(6144, 4096)
    '6144x4096'
    """
    return f"{n}x{k}"


# --------------------------------------------------------------------------- the table


def load_choices(path: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """The dispatch table at ``path`` (default: ``$FXFUSE_SMALL_GEMM_CHOICES``, else the
    shipped one), checked; a missing shipped table is an empty one.

    >>> load_choices()["devices"]  # doctest: +SKIP
    {}
    """
    if path is None:
        path = os.environ.get(CHOICES_ENV) or CHOICES_PATH
    return _load(str(path))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict[str, Any]:
    p = pathlib.Path(path)
    if not p.exists():
        if p == CHOICES_PATH:
            return {"devices": {}, "measured": {}}
        raise FileNotFoundError(f"small-GEMM choices table {path} does not exist (set by ${CHOICES_ENV}?)")
    table = json.loads(p.read_text())
    check_choices(table, path)
    return table


def check_choices(table: Any, where: str = "small-GEMM choices") -> None:
    """Raise a ``ValueError`` naming what is wrong with a dispatch table."""
    if not isinstance(table, dict) or not isinstance(table.get("devices"), dict):
        raise ValueError(f"{where}: a small-GEMM choices table needs a 'devices' mapping")
    for dev, ops in table["devices"].items():
        if not isinstance(ops, dict):
            raise ValueError(f"{where}: devices[{dev!r}] must map op names to entries")
        for op, entry in ops.items():
            if not is_table_op(op):
                raise ValueError(f"{where}: devices[{dev!r}] names unknown op {op!r}; known: {list(OPS)} "
                                 "and their fused forms (fused_key)")
            if not isinstance(entry, dict) or not isinstance(entry.get("max_tokens"), int):
                raise ValueError(f"{where}: devices[{dev!r}][{op!r}] needs an int 'max_tokens'")
            for key, v in entry.get("by_shape", {}).items():
                if not isinstance(v, int):
                    raise ValueError(f"{where}: devices[{dev!r}][{op!r}].by_shape[{key!r}] must be an int")
            for key, per_m in entry.get("configs", {}).items():
                for m, cfg in per_m.items():
                    try:
                        int(m)
                        SmallGemmConfig.from_dict(cfg)
                    except (TypeError, ValueError) as e:
                        raise ValueError(f"{where}: devices[{dev!r}][{op!r}].configs[{key!r}][{m!r}]: {e}") from None


def choose(
    table: dict[str, Any], device: str, op: str, m: int, n: int, k: int, group_k: Optional[int] = None,
    sms: int = 132, default: Optional[Callable[[], SmallGemmConfig]] = None,
) -> Optional[SmallGemmConfig]:
    """The kernel's config for ``m`` tokens through an ``n x k`` weight on ``device``
    (a table device name), or None where the table keeps the op's other path.

    The token limit is the entry's ``by_shape`` value for this weight, else its
    ``max_tokens`` (never above `MAX_TOKENS`); ``$FXFUSE_SMALL_GEMM_MAX_TOKENS`` replaces
    both. The config is the one measured for this weight at the smallest measured token
    count at or above ``m`` (the same row tile), else `default_config` (``group_k``: the
    activation group size of ``block_fp8_linear``; ``sms``: the device's multiprocessors;
    ``default``: what makes the config where none was measured, for a fused form).

    >>> t = {"devices": {"GPU": {"fp8_linear": {"max_tokens": 16}}}}
    >>> choose(t, "GPU", "fp8_linear", 4, 4096, 4096).block_n, choose(t, "GPU", "fp8_linear", 17, 4096, 4096)
    (64, None)
    """
    if m < 1:
        return None
    env = os.environ.get(MAX_TOKENS_ENV, "").strip()
    entry = table["devices"].get(device, {}).get(op)
    if env:
        try:
            limit = int(env)
        except ValueError:
            raise ValueError(f"${MAX_TOKENS_ENV} must be an integer token count, got {env!r}") from None
    elif entry is None:
        return None
    else:
        limit = entry.get("by_shape", {}).get(shape_key(n, k), entry["max_tokens"])
    if m > min(limit, MAX_TOKENS):
        return None
    per_m = (entry or {}).get("configs", {}).get(shape_key(n, k), {})
    at_or_above = sorted(int(t) for t in per_m if int(t) >= m and block_m_for(int(t)) == block_m_for(m))
    if at_or_above:
        config = SmallGemmConfig.from_dict(per_m[str(at_or_above[0])])
        if group_k is None or config.block_k % group_k == 0:  # measured at another group size
            return config
    return default() if default is not None else default_config(m, n, k, group_k, sms)


def token_limit(table: dict[str, Any], device: str, op: str, n: int, k: int) -> int:
    """The largest token count at which ``op`` (a `fused_key` too) runs the small-batch
    kernel on ``device`` for an ``n x k`` weight: 0 where the table has no entry. What
    `choose` compares the token count with (``$FXFUSE_SMALL_GEMM_MAX_TOKENS`` included).

    >>> token_limit({"devices": {"GPU": {"fp8_linear>silu_and_mul": {"max_tokens": 8}}}}, "GPU",
    ...             "fp8_linear>silu_and_mul", 28672, 4096)
    8
    """
    env = os.environ.get(MAX_TOKENS_ENV, "").strip()
    if env:
        try:
            return min(int(env), MAX_TOKENS)
        except ValueError:
            raise ValueError(f"${MAX_TOKENS_ENV} must be an integer token count, got {env!r}") from None
    entry = table["devices"].get(device, {}).get(op)
    if entry is None:
        return 0
    return min(entry.get("by_shape", {}).get(shape_key(n, k), entry["max_tokens"]), MAX_TOKENS)


# --------------------------------------------------------------------------- writing a table


def choices_from_rows(rows: list[dict[str, Any]], margin: float = 0.03) -> dict[str, dict[str, Any]]:
    """A device's table entry from measurements: ``rows`` hold, per op, weight shape and
    token count, the kernel's best time ``us`` with its ``config`` (a dict) and the time
    of the path the op takes otherwise, ``baseline_us``.

    Per weight shape the kernel's limit is the largest measured token count up to which
    it wins at every measured count, by more than ``margin`` (noise); ``max_tokens`` is
    the smallest limit over the shapes (what an unmeasured shape gets), ``by_shape`` the
    shapes whose limit differs, ``configs`` the best config per shape and count where the
    kernel runs.

    >>> rows = [dict(op="fp8_linear", n=64, k=64, tokens=t, us=u, baseline_us=10.0, config={"block_n": 64,
    ...          "block_k": 64}) for t, u in ((1, 5.0), (16, 8.0), (64, 11.0))]
    >>> choices_from_rows(rows)["fp8_linear"]["max_tokens"]
    16
    """
    per_op: dict[str, dict[str, list]] = {}
    for r in rows:
        per_op.setdefault(r["op"], {}).setdefault(shape_key(r["n"], r["k"]), []).append(r)
    out = {}
    for op, shapes in sorted(per_op.items()):
        limits, configs = {}, {}
        for key, rs in sorted(shapes.items()):
            limit = 0
            for r in sorted(rs, key=lambda r: r["tokens"]):
                if not r["us"] < r["baseline_us"] * (1 - margin):
                    break
                limit = r["tokens"]
                configs.setdefault(key, {})[str(r["tokens"])] = dict(r["config"])
            limits[key] = min(limit, MAX_TOKENS)
        floor = min(limits.values())
        out[op] = dict(max_tokens=floor, by_shape={k: v for k, v in limits.items() if v != floor}, configs=configs)
    return out


def write_choices(path: str | os.PathLike, device: str, entry: dict[str, Any], stamp: str,
                  merge: bool = False) -> dict[str, Any]:
    """Put ``device``'s ``entry`` (``{op: {...}}``, `choices_from_rows`) into the table at
    ``path``, keeping the other devices of a table already there; ``stamp`` (date,
    versions, command) goes under ``measured``. ``merge``: keep the ops of ``device``'s
    entry that ``entry`` does not name (the fused forms measured after the plain ops),
    and add ``stamp`` to its stamp. Returns the table written.

    Example:
        >>> write_choices("small_gemm_choices.json", "NVIDIA H200", entry, "2026-12-10, torch 2.11")  # doctest: +SKIP
    """
    p = pathlib.Path(path)
    table: dict[str, Any] = {"devices": {}, "measured": {}}
    if p.exists():
        table = json.loads(p.read_text())
        check_choices(table, str(p))
        table.setdefault("measured", {})
    if merge and device in table["devices"]:
        entry = {**table["devices"][device], **entry}
        stamp = "; ".join(x for x in (table["measured"].get(device), stamp) if x)
    table["devices"][device] = entry
    table["measured"][device] = stamp
    check_choices(table, str(p))
    p.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _load.cache_clear()
    return table
