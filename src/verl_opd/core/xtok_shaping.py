"""Potential-based shaping of cross-tokenizer chunk log-ratios: removes the boundary lookahead (bias C).

A canonical token says something about the text that FOLLOWS it. Under a Llama-3-style tokenizer the
token "57" means "the digit run is exactly 57" (a longer run would start with "571"); under a Qwen-style
tokenizer the tokens "5", "7" say nothing about what follows. So at a chunk boundary b_c the teacher's
chunk log-prob T_c and the student's S_c condition on different events, and the chunk log-ratio
``d_c = S_c - T_c`` is nonzero even where both models give every string the same probability. It
telescopes to zero over the sequence, but a per-chunk (discount 0) advantage trains on it, and the
student converges to the wrong distribution (``shared/design/cross-tokenizer-opd.md`` §1 C).

The fix is a potential at each chunk boundary, the log of how much the chunk's last token over-commits::

    Phi_T(b_c) = log sum_{v : bytes(v) starts with bytes(z_u)} T(v | z_<u)  -  log T(z_u | z_<u)   (>= 0)

for the chunk's last teacher token z_u: the teacher's mass on every vocabulary entry that extends the
bytes of z_u, over the mass of z_u itself. ``T_c + Phi_T(b_c) - Phi_T(b_{c-1})`` is then the teacher's
byte-prefix log-mass of the chunk (the one-token-lookback form of the byte-prefix marginal). ``Phi_S``
is the same on the student's tokens. The shaped chunk log-ratio is::

    d'_c = d_c + (Phi_S(b_c) - Phi_S(b_{c-1})) - (Phi_T(b_c) - Phi_T(b_{c-1}))

with ``Phi(b_{-1}) = 0`` (the start) and ``Phi = 0`` after an EOS chunk, so ``sum_c d'_c = sum_c d_c``:
the sequence log-ratio, and hence the full-sequence return, are unchanged (potential-based shaping).
Sign: Phi_T > 0 means the teacher's last token was "too specific", so its chunk score is raised by Phi_T
and the next chunk's lowered; ``d'`` subtracts that. Ends of a truncated response are not "after EOS":
Phi there is kept, the sum is not preserved, and the truncated last chunk is masked anyway.

Everything here is numpy/torch only (no verl, no transformers): byte tables, ids and log-probs in.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "EXTENSION_ROWS_PER_BLOCK",
    "EXTENSION_BUFFERS",
    "ExtensionTable",
    "extension_table",
    "extension_log_mass",
    "teacher_potential",
    "potential_shift",
    "shaped_chunk_log_ratio",
]


# Positions whose extension mass is computed at once (:func:`extension_log_mass` on a block of logits): bounds
# the temporaries to EXTENSION_BUFFERS (rows, V) fp32 tensors (log-softmax, its sorted gather, the masked copy).
EXTENSION_ROWS_PER_BLOCK = 256
EXTENSION_BUFFERS = 3


@dataclass(frozen=True)
class ExtensionTable:
    """For every token id, the ids whose bytes start with its bytes, as ranges of one sorted order.

    Sorting the byte strings puts every string that starts with ``b`` in one contiguous run right after
    ``b``, so the extensions of id ``i`` are ``order[start[i]:stop[i]]``: O(V) memory for any vocabulary
    (a 150k-entry table builds in under a second on one core), where an explicit id list per entry would hold
    every short token's thousands of extensions. Every id extends itself. Special ids extend only
    themselves and are nobody's extension: their bytes are a tag's spelling, not text that could follow.
    """

    order: np.ndarray | torch.Tensor  # (V,) int64: the ids, non-special ones sorted by bytes, then the special ones
    start: np.ndarray | torch.Tensor  # (V,) int64: first position in ``order`` of id i's extensions
    stop: np.ndarray | torch.Tensor  # (V,) int64: one past the last

    def extensions(self, token_id: int) -> np.ndarray | torch.Tensor:
        """The ids whose bytes start with ``token_id``'s bytes (``token_id`` included)."""
        return self.order[self.start[token_id] : self.stop[token_id]]

    def to(self, device: torch.device | str) -> ExtensionTable:
        """The same table as int64 tensors on ``device``: :func:`extension_log_mass` then copies nothing per call
        (a 150k-entry table is ~3.6 MB that would otherwise cross to the accelerator for every block of logits)."""
        arrays = (self.order, self.start, self.stop)
        return ExtensionTable(*(torch.as_tensor(a, dtype=torch.long, device=device) for a in arrays))


def _after_prefix(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with ``prefix``; None if there is none.

    Drop trailing 0xff bytes (nothing sorts between ``p + b"\\xff..."`` and the next prefix) and
    increment the last remaining byte; an all-0xff prefix is followed by nothing.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def extension_table(byte_table: Sequence[bytes], special_ids: Collection[int] = ()) -> ExtensionTable:
    """Build the :class:`ExtensionTable` of a byte table (``byte_table[i]`` = the bytes id ``i`` contributes).

    Raises ``ValueError`` for a non-special id with no bytes: an empty string is a prefix of every
    token, so its potential would be meaningless; such ids (EOS, tags) must be listed in ``special_ids``.
    """
    size = len(byte_table)
    special = {int(i) for i in special_ids}
    outside = sorted(i for i in special if not 0 <= i < size)
    if outside:
        raise ValueError(f"special_ids {outside} are outside the byte table of {size} entries.")
    empty = [i for i in range(size) if i not in special and len(byte_table[i]) == 0]
    if empty:
        raise ValueError(
            f"token ids {empty[:10]} have no bytes but are not in special_ids: an empty token would extend "
            "to the whole vocabulary. List zero-byte ids (EOS, added tags) as special."
        )
    text_ids = sorted((i for i in range(size) if i not in special), key=lambda i: bytes(byte_table[i]))
    keys = [bytes(byte_table[i]) for i in text_ids]
    start = np.empty(size, dtype=np.int64)
    stop = np.empty(size, dtype=np.int64)
    for i in text_ids:
        prefix = bytes(byte_table[i])
        start[i] = bisect.bisect_left(keys, prefix)
        after = _after_prefix(prefix)
        stop[i] = len(keys) if after is None else bisect.bisect_left(keys, after)
    special_sorted = sorted(special)
    for position, i in enumerate(special_sorted, start=len(keys)):
        start[i], stop[i] = position, position + 1
    order = np.asarray(text_ids + special_sorted, dtype=np.int64)
    return ExtensionTable(order=order, start=start, stop=stop)


def extension_log_mass(log_probs: torch.Tensor, last_ids: torch.Tensor, table: ExtensionTable) -> torch.Tensor:
    """``log sum_{v extends last_ids[n]} exp(log_probs[n, v])`` for every row n.

    Args:
        log_probs: ``(N, V)`` next-token log-probs (normalised over the vocabulary) at N positions.
        last_ids: ``(N,)`` the token actually taken at each position.
        table: the vocabulary's :class:`ExtensionTable` (``len(table.order) == V``).

    Returns:
        ``(N,)`` in the dtype of ``log_probs``, always ``>= log_probs[n, last_ids[n]]`` since every id
        extends itself. A masked logsumexp over the sorted vocabulary: O(N·V) like the logits themselves
        (call it per micro-batch) and exact, where a cumulative-sum difference would lose a small
        extension mass to cancellation against the whole vocabulary's.
    """
    if log_probs.dim() != 2 or last_ids.dim() != 1 or last_ids.shape[0] != log_probs.shape[0]:
        raise ValueError(
            f"log_probs must be (N, V) and last_ids (N,); got {tuple(log_probs.shape)} and {tuple(last_ids.shape)}."
        )
    if log_probs.shape[1] != len(table.order):
        raise ValueError(
            f"log_probs has {log_probs.shape[1]} vocabulary entries but the extension table {len(table.order)}: "
            "build the table from the byte table of the model that produced the log-probs."
        )
    device = log_probs.device
    order = torch.as_tensor(table.order, device=device)
    ids = last_ids.to(device=device, dtype=torch.long)
    start = torch.as_tensor(table.start, device=device)[ids].unsqueeze(1)
    stop = torch.as_tensor(table.stop, device=device)[ids].unsqueeze(1)
    rank = torch.arange(order.shape[0], device=device).unsqueeze(0)
    inside = (rank >= start) & (rank < stop)
    sorted_log_probs = log_probs[:, order]
    neg_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=device)
    return torch.logsumexp(torch.where(inside, sorted_log_probs, neg_inf), dim=1)


def teacher_potential(
    log_probs: torch.Tensor,
    log_extension_mass: torch.Tensor,
    token_chunk: np.ndarray | torch.Tensor,
    n_chunks: int,
    *,
    ends_with_eos: bool,
) -> torch.Tensor:
    """``Phi(b_c) = log_extension_mass[u] - log_probs[u]`` at each chunk's last token u; ``(n_chunks,)``.

    Written for the teacher (``Phi_T``, the v1 shaping); the student's ``Phi_S`` is the same function of
    the student's per-token arrays. ``ends_with_eos``: the last chunk is the EOS pair, after which the
    text is over, so its potential is 0 (what makes the shaping telescope to the unshaped sum).

    Args:
        log_probs: ``(U,)`` log-prob of each response token (``log T(z_u | z_<u)``).
        log_extension_mass: ``(U,)`` from :func:`extension_log_mass` at the same positions.
        token_chunk: ``(U,)`` chunk index of each token, non-decreasing, every chunk present
            (``ChunkAlignment.teacher_chunk``).
        n_chunks: the number of chunks.
    """
    chunk = torch.as_tensor(np.asarray(token_chunk), dtype=torch.long, device=log_probs.device)
    if log_probs.shape != log_extension_mass.shape or log_probs.shape != chunk.shape or log_probs.dim() != 1:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, log_extension_mass {tuple(log_extension_mass.shape)} and "
            f"token_chunk {tuple(chunk.shape)} must be the same 1-D length (one entry per response token)."
        )
    present = torch.zeros(n_chunks, dtype=torch.bool, device=chunk.device)
    present[chunk] = True
    if chunk.numel() and (bool((chunk[1:] < chunk[:-1]).any()) or not bool(present.all())):
        raise ValueError("token_chunk must be non-decreasing and give every chunk at least one token.")
    positions = torch.arange(chunk.shape[0], device=chunk.device)
    last = torch.zeros(n_chunks, dtype=torch.long, device=chunk.device).scatter_reduce(
        0, chunk, positions, reduce="amax", include_self=False
    )
    phi = log_extension_mass[last] - log_probs[last]
    if ends_with_eos and n_chunks:
        phi[-1] = 0.0
    return phi


def potential_shift(phi_student: torch.Tensor | None, phi_teacher: torch.Tensor) -> torch.Tensor:
    """``(Phi_S(b_c) - Phi_S(b_{c-1})) - (Phi_T(b_c) - Phi_T(b_{c-1}))`` per chunk, with ``Phi(b_{-1}) = 0``.

    ``phi_student=None`` is teacher-side shaping (``Phi_S = 0``). The shaped teacher chunk score that an
    advantage taking ``T_c`` should get is ``T_c - potential_shift(...)``.
    """
    shift = -torch.diff(phi_teacher, prepend=phi_teacher.new_zeros(1))
    if phi_student is not None:
        if phi_student.shape != phi_teacher.shape:
            raise ValueError(
                f"phi_student {tuple(phi_student.shape)} and phi_teacher {tuple(phi_teacher.shape)} must both "
                "have one entry per chunk."
            )
        shift = shift + torch.diff(phi_student, prepend=phi_student.new_zeros(1))
    return shift


def shaped_chunk_log_ratio(
    chunk_log_ratio: torch.Tensor, phi_student: torch.Tensor | None, phi_teacher: torch.Tensor
) -> torch.Tensor:
    """``d'_c = d_c + ΔPhi_S - ΔPhi_T`` (module docstring); the sum over a sequence ending in EOS is unchanged."""
    if chunk_log_ratio.shape != phi_teacher.shape:
        raise ValueError(
            f"chunk_log_ratio {tuple(chunk_log_ratio.shape)} and phi_teacher {tuple(phi_teacher.shape)} must "
            "both have one entry per chunk."
        )
    return chunk_log_ratio + potential_shift(phi_student, phi_teacher)
