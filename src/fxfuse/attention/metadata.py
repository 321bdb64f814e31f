"""Batch metadata: where each sequence's new tokens are, how long it is, where its K/V live.

The model runner builds one :class:`AttentionMetadata` per batch (usually with
:meth:`AttentionMetadata.from_lens`) and puts it in the forward context; the op
validates it against the layer's KV cache once per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from ._common import _PREFIX, _is_int


@dataclasses.dataclass(eq=False)
class AttentionMetadata:
    """Where each sequence's new tokens are, how long each sequence is, and where its K/V live.

    Sequences are concatenated along the token axis; sequence ``i`` has its new tokens
    at rows ``query_start_loc[i]:query_start_loc[i+1]`` and ``seq_lens[i]`` tokens in
    total (cached context + new). Its new token ``j`` sits at absolute position
    ``seq_lens[i] - n_new_i + j`` and attends to positions ``0..`` that position.
    Position ``p`` of sequence ``i`` is stored in cache block ``block_table[i, p // bs]``
    at offset ``p % bs``; ``slot_mapping[t] = block * bs + offset`` for each new token
    ``t``, which is where the op writes that token's key and value.

    Attributes:
        query_start_loc: int32 ``[B + 1]``, starts at 0, non-decreasing, ends at ``T``.
        seq_lens: int32 ``[B]``.
        block_table: int32 ``[B, max_blocks]``; entries past a sequence's last block
            are never read.
        slot_mapping: int64 ``[T]``.
        max_query_len: host-side upper bound of the new-token counts.
        max_seq_len: host-side upper bound of ``seq_lens``.

    Use :meth:`from_lens` to build one from Python lists.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # The (num_tokens, block_size, num_blocks) this object passed `validate` with.
    _validated: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0]) if isinstance(self.seq_lens, torch.Tensor) else 0

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def device(self) -> torch.device:
        return self.slot_mapping.device

    @classmethod
    def from_lens(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_table: Union[torch.Tensor, Sequence[Sequence[int]]],
        block_size: int,
        device: Union[torch.device, str, None] = None,
    ) -> "AttentionMetadata":
        """Build the metadata from per-sequence new-token counts, total lengths and block lists.

        ``block_table`` may be ragged (a list of block-id lists); rows are padded with
        block 0, which is never read. ``slot_mapping`` is derived from it, so the two
        always agree.

        >>> m = AttentionMetadata.from_lens([3, 1], [3, 18], [[7], [2, 5]], block_size=16)
        >>> m.query_start_loc.tolist(), m.slot_mapping.tolist()
        ([0, 3, 4], [112, 113, 114, 81])
        """
        if len(query_lens) != len(seq_lens):
            raise ValueError(
                f"{_PREFIX}: `query_lens` and `seq_lens` must have one entry per sequence, "
                f"got {len(query_lens)} and {len(seq_lens)}"
            )
        if not _is_int(block_size) or block_size <= 0:
            raise ValueError(f"{_PREFIX}: `block_size` must be a positive int, got {block_size!r}")
        if isinstance(block_table, torch.Tensor):
            table = block_table.to(device="cpu", dtype=torch.int32)
        else:
            rows = [list(r) for r in block_table]
            width = max((len(r) for r in rows), default=0)
            table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32).reshape(
                len(rows), width
            )
        if table.dim() != 2 or table.shape[0] != len(seq_lens):
            raise ValueError(
                f"{_PREFIX}: `block_table` must have one row per sequence ({len(seq_lens)}), "
                f"got shape {tuple(table.shape)}"
            )
        qsl = [0]
        slots: list[int] = []
        for i, (n_new, total) in enumerate(zip(query_lens, seq_lens)):
            if not (_is_int(n_new) and _is_int(total) and 0 <= n_new <= total):
                raise ValueError(
                    f"{_PREFIX}: sequence {i} must have 0 <= query_len <= seq_len, "
                    f"got query_len={n_new!r}, seq_len={total!r}"
                )
            needed = -(-total // block_size)
            if needed > table.shape[1]:
                raise ValueError(
                    f"{_PREFIX}: sequence {i} (seq_len {total}) needs {needed} blocks of size "
                    f"{block_size}, but its `block_table` row has {table.shape[1]}"
                )
            qsl.append(qsl[-1] + n_new)
            for pos in range(total - n_new, total):
                slots.append(int(table[i, pos // block_size]) * block_size + pos % block_size)
        return cls(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            block_table=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )

    def validate_once(self, num_tokens: int, *, block_size: int, num_blocks: int) -> None:
        """:meth:`validate`, unless this object already passed it for the same arguments.

        The attention op calls this, so a batch's metadata is read back to the host once,
        not once per layer. A runner that refills the tensors in place (to replay a CUDA
        graph) calls :meth:`validate` itself after each refill. Inside a CUDA graph
        capture nothing can be read back: metadata must have been validated before.

        >>> meta.validate_once(5, block_size=16, num_blocks=8)  # reads; a second call does not
        """
        key = (num_tokens, block_size, num_blocks)
        if self._validated == key:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{_PREFIX}: the forward context's metadata must be validated before a CUDA graph "
                f"capture (call metadata.validate({num_tokens}, block_size={block_size}, "
                f"num_blocks={num_blocks}) first): validating reads the tensors back to the host"
            )
        self.validate(num_tokens, block_size=block_size, num_blocks=num_blocks)

    def validate(
        self, num_tokens: int, *, block_size: Optional[int] = None, num_blocks: Optional[int] = None
    ) -> None:
        """Raise ``ValueError`` unless this metadata describes a batch of ``num_tokens`` new tokens.

        Always checked: tensor types, dtypes, ranks, devices; ``query_start_loc`` starts at
        0, never decreases and ends at ``num_tokens`` (the new tokens of all sequences add
        up to ``T``); ``0 <= n_new_i <= seq_lens[i]``; ``max_query_len``/``max_seq_len``
        are ints at least as large as the real maxima.

        With ``block_size`` (the KV cache's): each sequence's ``block_table`` row has
        ``ceil(seq_lens[i] / block_size)`` entries, and ``slot_mapping`` is the slot the
        block table gives each new token's position (else the op would write K/V where
        it does not read them). With ``num_blocks`` as well: the block ids read and the
        slots written lie inside the cache.

        Reads the tensors' values (a device sync on GPU).
        """
        self._validated = None  # a failed re-validation must not leave an old pass standing
        fields = {
            "query_start_loc": (self.query_start_loc, torch.int32, 1),
            "seq_lens": (self.seq_lens, torch.int32, 1),
            "block_table": (self.block_table, torch.int32, 2),
            "slot_mapping": (self.slot_mapping, torch.int64, 1),
        }
        for fname, (t, dtype, ndim) in fields.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{_PREFIX}: metadata `{fname}` must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"{_PREFIX}: metadata `{fname}` must have dtype {dtype}, got {t.dtype}")
            if t.dim() != ndim:
                raise ValueError(
                    f"{_PREFIX}: metadata `{fname}` must have {ndim} dimension(s), got shape {tuple(t.shape)}"
                )
            if t.device != self.slot_mapping.device:
                raise ValueError(
                    f"{_PREFIX}: metadata `{fname}` must be on the device of `slot_mapping` "
                    f"({self.slot_mapping.device}), got {t.device}"
                )
        for fname in ("max_query_len", "max_seq_len"):
            v = getattr(self, fname)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{_PREFIX}: metadata `{fname}` must be a non-negative int, got {v!r}")
        if not _is_int(num_tokens) or num_tokens < 0:
            raise ValueError(f"{_PREFIX}: `num_tokens` must be a non-negative int, got {num_tokens!r}")

        num_seqs = self.seq_lens.shape[0]
        if self.query_start_loc.shape[0] != num_seqs + 1:
            raise ValueError(
                f"{_PREFIX}: metadata `query_start_loc` must have num_seqs + 1 = {num_seqs + 1} entries "
                f"(`seq_lens` has {num_seqs}), got {self.query_start_loc.shape[0]}"
            )
        if self.block_table.shape[0] != num_seqs:
            raise ValueError(
                f"{_PREFIX}: metadata `block_table` must have one row per sequence ({num_seqs}), "
                f"got shape {tuple(self.block_table.shape)}"
            )
        if self.slot_mapping.shape[0] != num_tokens:
            raise ValueError(
                f"{_PREFIX}: metadata `slot_mapping` must have one entry per new token ({num_tokens}), "
                f"got {self.slot_mapping.shape[0]}"
            )

        # One host copy of everything; the checks below are on CPU.
        qsl = self.query_start_loc.cpu().long()
        seq_lens = self.seq_lens.cpu().long()
        if qsl[0].item() != 0:
            raise ValueError(f"{_PREFIX}: metadata `query_start_loc` must start at 0, got {qsl[0].item()}")
        query_lens = qsl[1:] - qsl[:-1]
        if num_seqs and (query_lens < 0).any():
            i = int(torch.nonzero(query_lens < 0)[0])
            raise ValueError(
                f"{_PREFIX}: metadata `query_start_loc` must be non-decreasing, "
                f"got {qsl[i].item()} then {qsl[i + 1].item()} at sequence {i}"
            )
        if qsl[-1].item() != num_tokens:
            raise ValueError(
                f"{_PREFIX}: the sequences' new tokens (query_start_loc[-1] = {qsl[-1].item()}) "
                f"must add up to the number of tokens ({num_tokens})"
            )
        bad = (query_lens > seq_lens) | (seq_lens < 0)
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"{_PREFIX}: sequence {i} must have 0 <= new tokens <= seq_len, "
                f"got {query_lens[i].item()} new tokens and seq_len {seq_lens[i].item()}"
            )
        if num_seqs:
            if self.max_query_len < query_lens.max().item():
                raise ValueError(
                    f"{_PREFIX}: metadata `max_query_len` ({self.max_query_len}) must be at least "
                    f"the largest number of new tokens of a sequence ({query_lens.max().item()})"
                )
            if self.max_seq_len < seq_lens.max().item():
                raise ValueError(
                    f"{_PREFIX}: metadata `max_seq_len` ({self.max_seq_len}) must be at least "
                    f"the largest `seq_lens` entry ({seq_lens.max().item()})"
                )
        if block_size is None:
            return

        if not _is_int(block_size) or block_size <= 0:
            raise ValueError(f"{_PREFIX}: `block_size` must be a positive int, got {block_size!r}")
        table = self.block_table.cpu().long()
        needed = (seq_lens + block_size - 1) // block_size
        short = needed > table.shape[1]
        if short.any():
            i = int(torch.nonzero(short)[0])
            raise ValueError(
                f"{_PREFIX}: metadata `block_table` is too short for sequence {i}: seq_len "
                f"{seq_lens[i].item()} needs {needed[i].item()} blocks of size {block_size}, "
                f"but a row has {table.shape[1]}"
            )
        if num_blocks is not None and num_seqs:
            used = torch.arange(table.shape[1]).unsqueeze(0) < needed.unsqueeze(1)
            out_of_range = used & ((table < 0) | (table >= num_blocks))
            if out_of_range.any():
                i, j = (int(v) for v in torch.nonzero(out_of_range)[0])
                raise ValueError(
                    f"{_PREFIX}: metadata `block_table[{i}, {j}]` = {table[i, j].item()} is not a "
                    f"block of the KV cache (it has {num_blocks} blocks)"
                )
        slots = self.slot_mapping.cpu()
        if num_tokens:
            if num_blocks is not None:
                n_slots = num_blocks * block_size
                oob = (slots < 0) | (slots >= n_slots)
                if oob.any():
                    t = int(torch.nonzero(oob)[0])
                    raise ValueError(
                        f"{_PREFIX}: metadata `slot_mapping[{t}]` = {slots[t].item()} is outside the "
                        f"KV cache's {n_slots} slots ({num_blocks} blocks of {block_size})"
                    )
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)
            pos = (
                seq_lens[seq_of_token]
                - query_lens[seq_of_token]
                + (torch.arange(num_tokens) - qsl[:-1][seq_of_token])
            )
            expected = table[seq_of_token, pos // block_size] * block_size + pos % block_size
            wrong = slots != expected
            if wrong.any():
                t = int(torch.nonzero(wrong)[0])
                i = int(seq_of_token[t])
                raise ValueError(
                    f"{_PREFIX}: metadata `slot_mapping[{t}]` = {slots[t].item()} disagrees with "
                    f"`block_table`: token {t} is position {pos[t].item()} of sequence {i}, "
                    f"which the block table puts in slot {expected[t].item()}"
                )
        if num_blocks is not None:
            self._validated = (num_tokens, block_size, num_blocks)
