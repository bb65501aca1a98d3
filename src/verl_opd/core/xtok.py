"""Cross-tokenizer OPD (``opd.teacher.view=own``): chunk alignment and the chunk advantage.

Pure numpy/torch: ids, byte tables and tensors in, arrays and tensors out; no verl and
no tokenizer library (see ``shared/design/cross-tokenizer-opd.md`` for the math).

The student samples ``y_1..y_n`` whose bytes are the response text ``s``; the teacher
scores its own tokens ``z = kappa_T(s)`` (plus its end-of-turn tokens when ``y`` ended with
EOS). Both tokenisations are cut at the byte offsets where *both* have a token boundary;
the spans between consecutive cuts are the chunks. For chunk ``c``::

    S_c = sum_{t in c} log pi_S(y_t | .)          T_c = sum_{u in c} log pi_T(z_u | .)
    d_c = S_c - T_c                               r_c = -kl_coef * d_c
    G_c = r_c + discount * G_{c+1}                over kept chunks (masked chunks skipped)
    A_t = G_{c(t)} + task_reward_coef * (R - b)   every student token of c gets G_c

With identical tokenizers every chunk is one token and this is exactly
:func:`verl_opd.core.advantage.compute_opd_advantage`. Sign as there: ``A > 0`` where the
teacher gives the chunk's text more probability than the student did.

A byte table is a ``Sequence[bytes]`` indexed by token id: the exact bytes each id adds to
the text (a special/added token: its string's UTF-8 bytes; whether it is special is said
separately). Offsets are computed on bytes, never on decoded strings: a multi-byte
character split across tokens decodes per token to U+FFFD, yet its bytes align exactly.

The text the teacher reads is :func:`response_text` of the student's bytes: invalid UTF-8
(a response cut mid-character, stray bytes) becomes U+FFFD there. :func:`align_chunks`
maps offsets through that replacement and masks the chunks it touches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from verl_opd.core.advantage import (
    _check_same_2d,
    discounted_reward_to_go,
    opd_token_rewards,
    with_task_advantage,
)

__all__ = [
    "KEPT",
    "NONCANONICAL",
    "TRUNCATED",
    "SPECIAL",
    "INVALID_UTF8",
    "PROMPT_CUT",
    "mask_sample",
    "MASK_REASONS",
    "ChunkAlignment",
    "response_text",
    "align_chunks",
    "noncanonical_tokens",
    "chunk_rewards",
    "advantage_from_chunk_rewards",
    "compute_xtok_opd_advantage",
    "chunk_metrics",
    "token_chunk_metrics",
    "shaping_metrics",
]

# Per-chunk mask reasons (ChunkAlignment.mask_reason). A chunk with several reasons gets the
# highest in this order: INVALID_UTF8 > SPECIAL > NONCANONICAL > TRUNCATED.
KEPT = 0
NONCANONICAL = 1  # holds a student token its own tokenizer would not produce for that text (bias A)
TRUNCATED = 2  # last chunk of a response cut by the length limit: the teacher's tokens assert an ending
SPECIAL = 3  # holds an added/special student token (<think>, tool tags): its text means something else
INVALID_UTF8 = 4  # touches bytes that are not valid UTF-8: the teacher read U+FFFD there, not these bytes
# The whole sample: the student read a prompt cut by the rollout's prompt length, the teacher the whole
# conversation, so no chunk is scored in the same context (set by :func:`mask_sample`).
PROMPT_CUT = 5
MASK_REASONS: dict[int, str] = {
    NONCANONICAL: "noncanonical",
    TRUNCATED: "truncated",
    SPECIAL: "special",
    INVALID_UTF8: "invalid_utf8",
    PROMPT_CUT: "prompt_cut",
}

_REPLACEMENT_LEN = len("\ufffd".encode())  # 3 bytes: EF BF BD


@dataclass(frozen=True, eq=False)
class ChunkAlignment:
    """The chunks of one response, as produced by :func:`align_chunks`.

    Attributes:
        student_chunk: ``(n_student,)`` int64, chunk index of each student token (EOS included).
        teacher_chunk: ``(n_teacher,)`` int64, chunk index of each teacher token (end-of-turn included).
        n_chunks: number of chunks; indices run ``0..n_chunks-1`` in text order, the EOS pair last.
        mask_reason: ``(n_chunks,)`` int8, :data:`KEPT` or the reason the chunk is masked.
        n_noncanonical: number of student text tokens flagged non-canonical (for the rate metric).
    """

    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    n_chunks: int
    mask_reason: np.ndarray
    n_noncanonical: int

    @property
    def student_tokens_per_chunk(self) -> np.ndarray:
        """``(n_chunks,)`` number of student tokens in each chunk."""
        return np.bincount(self.student_chunk, minlength=self.n_chunks)

    @property
    def teacher_tokens_per_chunk(self) -> np.ndarray:
        """``(n_chunks,)`` number of teacher tokens in each chunk."""
        return np.bincount(self.teacher_chunk, minlength=self.n_chunks)

    def student_chunk_ids(self) -> np.ndarray:
        """Per student token, its chunk index, or -1 in a masked chunk: the ``chunk_ids`` row
        :func:`compute_xtok_opd_advantage` takes."""
        return np.where(self.mask_reason[self.student_chunk] == KEPT, self.student_chunk, -1)

    def teacher_log_probs_on_student(self, teacher_log_probs: np.ndarray) -> np.ndarray:
        """Per student token, ``T_c`` on the chunk's last student token and 0 elsewhere (float64).

        ``T_c`` sums the teacher's per-token log-probs over the chunk's teacher tokens; masked
        chunks get theirs too (the advantage ignores them, but sums over the row stay equal to
        the teacher's response log-prob). This is the ``teacher_chunk_log_probs`` row of
        :func:`compute_xtok_opd_advantage`.
        """
        values = np.asarray(teacher_log_probs, dtype=np.float64).reshape(-1)
        if values.shape[0] != self.teacher_chunk.shape[0]:
            raise ValueError(
                f"teacher_log_probs has {values.shape[0]} entries for {self.teacher_chunk.shape[0]} teacher "
                "tokens: pass one log-prob per teacher response token, end-of-turn tokens included."
            )
        chunk_sums = np.bincount(self.teacher_chunk, weights=values, minlength=self.n_chunks)
        out = np.zeros(self.student_chunk.shape[0], dtype=np.float64)
        if out.size:
            is_last = np.append(self.student_chunk[1:] != self.student_chunk[:-1], True)
            out[is_last] = chunk_sums[self.student_chunk[is_last]]
        return out


def _ids_array(name: str, ids: Sequence[int] | np.ndarray, table: Sequence[bytes]) -> np.ndarray:
    """``ids`` as a 1-D int64 array, or ``ValueError`` when one is outside the byte table."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= len(table)):
        bad = arr[(arr < 0) | (arr >= len(table))][0]
        raise ValueError(
            f"{name} holds id {int(bad)} outside its byte table (size {len(table)}): build the table from the "
            "same tokenizer, added tokens included."
        )
    return arr


def _bytes_and_spans(ids: np.ndarray, table: Sequence[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The concatenated bytes of ``ids`` and each token's start and end byte offsets (int64)."""
    pieces = [table[i] for i in ids.tolist()]
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    ends = np.cumsum(lengths)
    return b"".join(pieces), ends - lengths, ends


def response_text(student_ids: Sequence[int] | np.ndarray, student_table: Sequence[bytes]) -> str:
    """The text the teacher reads for these student text tokens (EOS excluded).

    The student's bytes decoded as UTF-8 with every invalid run replaced by U+FFFD, the
    same replacement :func:`align_chunks` assumes when it maps offsets. The bytes come from
    the byte table, not ``tokenizer.decode``, which may clean up spaces and break alignment.
    """
    data, _, _ = _bytes_and_spans(_ids_array("student_ids", student_ids, student_table), student_table)
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Utf8Repair:
    """Where ``data.decode("utf-8", errors="replace")`` replaces bytes, and the offset map it implies.

    ``starts``/``ends`` are the replaced byte ranges, in order; each becomes one U+FFFD
    (3 bytes) in the text. ``shift[k]`` is the text-minus-bytes offset after range ``k``.
    ``text_bytes`` is the UTF-8 of the repaired text: the bytes the teacher's tokens must spell.
    """

    starts: np.ndarray
    ends: np.ndarray
    shift: np.ndarray
    text_bytes: bytes

    @classmethod
    def of(cls, data: bytes) -> _Utf8Repair:
        """Find the replaced ranges with the decoder itself (each error's start/end), so they
        match Python's ``errors="replace"`` exactly."""
        starts: list[int] = []
        ends: list[int] = []
        pos = 0
        while True:
            try:
                data[pos:].decode("utf-8")
                break
            except UnicodeDecodeError as err:
                starts.append(pos + err.start)
                ends.append(pos + err.end)
                pos += err.end
        s = np.asarray(starts, dtype=np.int64)
        e = np.asarray(ends, dtype=np.int64)
        text_bytes = data.decode("utf-8", errors="replace").encode() if starts else data
        return cls(starts=s, ends=e, shift=np.cumsum(_REPLACEMENT_LEN - (e - s)), text_bytes=text_bytes)

    def to_text(self, offsets: np.ndarray) -> np.ndarray:
        """Byte offsets of the student's bytes -> offsets in the repaired text.

        An offset strictly inside a replaced range has no counterpart (no boundary can sit
        inside U+FFFD for both sides); it maps to the end of that range's U+FFFD.
        """
        if self.starts.size == 0:
            return offsets
        k = np.searchsorted(self.ends, offsets, side="right")  # ranges that end at or before the offset
        before = np.where(k > 0, self.shift[np.maximum(k - 1, 0)], 0)
        nxt = np.minimum(k, self.starts.size - 1)
        inside = (k < self.starts.size) & (self.starts[nxt] < offsets)
        return np.where(inside, self.ends[nxt] + self.shift[nxt], offsets + before)

    def touches(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per byte span ``[start, end)``, whether it overlaps a replaced range."""
        if self.starts.size == 0:
            return np.zeros(starts.shape, dtype=bool)
        k = np.searchsorted(self.ends, starts, side="right")  # first range ending after the span's start
        return (k < self.starts.size) & (self.starts[np.minimum(k, self.starts.size - 1)] < ends)


def _per_token_flags(name: str, flags: np.ndarray | None, n_ids: int, n_text: int) -> np.ndarray:
    """``flags`` over the student text tokens (bool), all False when None.

    Accepts one entry per student id (the EOS entry, if any, is ignored) or one per text token.
    """
    if flags is None:
        return np.zeros(n_text, dtype=bool)
    arr = np.asarray(flags, dtype=bool).reshape(-1)
    if arr.shape[0] not in (n_ids, n_text):
        raise ValueError(f"{name} has {arr.shape[0]} entries for {n_ids} student ids: give one bool per student token.")
    return arr[:n_text]


def align_chunks(
    student_ids: Sequence[int] | np.ndarray,
    teacher_ids: Sequence[int] | np.ndarray,
    student_table: Sequence[bytes],
    teacher_table: Sequence[bytes],
    *,
    student_eos: bool,
    teacher_eot_len: int,
    truncated: bool,
    noncanonical: np.ndarray | None = None,
    student_special: np.ndarray | None = None,
) -> ChunkAlignment:
    """Cut one response into chunks at the byte offsets where both tokenisations have a boundary.

    Args:
        student_ids: the student's response ids, its EOS id last when ``student_eos``.
        teacher_ids: the teacher's ids of :func:`response_text` of the student's text tokens,
            followed by its ``teacher_eot_len`` end-of-turn ids.
        student_table, teacher_table: byte tables (bytes per id) of the two tokenizers.
        student_eos: the response ended with the student's EOS. The EOS (no bytes) and the
            teacher's end-of-turn tokens form the last chunk, so
            ``d_EOS = log S(EOS) - sum log T(e_T)``.
        teacher_eot_len: number of end-of-turn ids at the end of ``teacher_ids``; >= 1 exactly
            when ``student_eos``.
        truncated: the response hit the length limit (no EOS); its last chunk is masked,
            because the teacher's canonical tokens of cut text assert an ending that isn't there.
        noncanonical: optional per student token bool (see :func:`noncanonical_tokens`); chunks
            holding a flagged token are masked :data:`NONCANONICAL` (the guard against bias A).
        student_special: optional per student token bool, True on added/special tokens; their
            chunks are masked :data:`SPECIAL`.

        The two flag arrays take one entry per student id or per text token (EOS excluded);
        the EOS entry is ignored.

    Returns:
        A :class:`ChunkAlignment`. Every chunk holds at least one student and one teacher token
        (for a non-empty text); chunk ``c`` covers the same bytes on both sides.

    Raises:
        ValueError: ids outside a byte table, inconsistent EOS/truncation arguments, or a teacher
            text that is not :func:`response_text` of the student's (the tables or the teacher
            encoding do not belong to this response).
    """
    s_ids = _ids_array("student_ids", student_ids, student_table)
    t_ids = _ids_array("teacher_ids", teacher_ids, teacher_table)
    if student_eos and truncated:
        raise ValueError("a response cannot both end with EOS and be truncated: pass student_eos or truncated.")
    if student_eos and s_ids.size == 0:
        raise ValueError("student_eos=True needs the EOS id as the last of student_ids; student_ids is empty.")
    if (teacher_eot_len >= 1) != bool(student_eos) or not 0 <= teacher_eot_len <= t_ids.size:
        raise ValueError(
            f"teacher_eot_len={teacher_eot_len} with student_eos={student_eos} and {t_ids.size} teacher ids: the "
            "student's EOS pairs with the teacher's end-of-turn ids, so pass teacher_eot_len >= 1 (the number of "
            "end-of-turn ids ending teacher_ids) exactly when the student ended with EOS, else 0."
        )
    n_s_text = s_ids.size - int(student_eos)
    n_t_text = t_ids.size - teacher_eot_len
    s_bytes, s_starts, s_ends = _bytes_and_spans(s_ids[:n_s_text], student_table)
    t_bytes, _, t_ends = _bytes_and_spans(t_ids[:n_t_text], teacher_table)

    repair = _Utf8Repair.of(s_bytes)
    if t_bytes != repair.text_bytes:
        raise ValueError(
            f"the teacher's response bytes ({len(t_bytes)}) are not the student's response text "
            f"({len(repair.text_bytes)} bytes): encode response_text(student text ids, student byte table) with the "
            "teacher tokenizer, without adding special tokens, and use each tokenizer's own byte table."
        )

    s_ends_text = repair.to_text(s_ends)
    cuts = np.intersect1d(s_ends_text, t_ends)  # sorted, unique: the common boundaries
    cuts = cuts[cuts > 0]
    if cuts.size == 0 and (n_s_text or n_t_text):
        cuts = np.zeros(1, dtype=np.int64)  # an all-empty text: its tokens form one chunk
    n_text_chunks = int(cuts.size)
    # A token ending at offset x belongs to the chunk closed by the first cut >= x.
    s_chunk = np.searchsorted(cuts, s_ends_text, side="left").astype(np.int64)
    t_chunk = np.searchsorted(cuts, t_ends, side="left").astype(np.int64)

    n_chunks = n_text_chunks + int(student_eos)
    reason = np.zeros(n_chunks, dtype=np.int8)
    if truncated and n_text_chunks:
        reason[n_text_chunks - 1] = TRUNCATED
    noncanon = _per_token_flags("noncanonical", noncanonical, s_ids.size, n_s_text)
    special = _per_token_flags("student_special", student_special, s_ids.size, n_s_text)
    for flags, code in ((noncanon, NONCANONICAL), (special, SPECIAL), (repair.touches(s_starts, s_ends), INVALID_UTF8)):
        reason[s_chunk[flags]] = code

    if student_eos:
        s_chunk = np.append(s_chunk, n_text_chunks)
        t_chunk = np.append(t_chunk, np.full(teacher_eot_len, n_text_chunks, dtype=np.int64))
    return ChunkAlignment(
        student_chunk=s_chunk,
        teacher_chunk=t_chunk,
        n_chunks=n_chunks,
        mask_reason=reason,
        n_noncanonical=int(noncanon.sum()),
    )


def mask_sample(alignment: ChunkAlignment, reason: int) -> ChunkAlignment:
    """``alignment`` with every chunk masked for ``reason`` (a sample-level problem such as :data:`PROMPT_CUT`)."""
    if reason not in MASK_REASONS:
        raise ValueError(f"unknown mask reason {reason}; use one of {sorted(MASK_REASONS)}")
    return dataclasses.replace(alignment, mask_reason=np.full(alignment.n_chunks, reason, dtype=np.int8))


def noncanonical_tokens(
    student_ids: Sequence[int] | np.ndarray,
    canonical_ids: Sequence[int] | np.ndarray,
    student_table: Sequence[bytes],
) -> np.ndarray:
    """Per student text token, True where the student's own tokenizer would not have produced it.

    ``canonical_ids`` is the student tokenizer's encoding of :func:`response_text` of
    ``student_ids`` (text tokens, EOS excluded). A token is canonical when its byte span is
    exactly the span of one canonical token with the same id. Same-tokenizer OPD never sees
    non-canonical splits (the teacher gives them almost no mass), but a cross-tokenizer
    teacher scores the *text*, so without this guard the student is paid for spreading mass
    over many spellings of one string (bias A of the design note).

    Tokens overlapping invalid UTF-8 are not judged (False): the canonical encoding saw U+FFFD
    there, and :func:`align_chunks` masks their chunks as :data:`INVALID_UTF8` anyway.
    """
    s_ids = _ids_array("student_ids", student_ids, student_table)
    c_ids = _ids_array("canonical_ids", canonical_ids, student_table)
    s_bytes, s_starts, s_ends = _bytes_and_spans(s_ids, student_table)
    c_bytes, c_starts, c_ends = _bytes_and_spans(c_ids, student_table)
    repair = _Utf8Repair.of(s_bytes)
    if c_bytes != repair.text_bytes:
        raise ValueError(
            f"canonical_ids spell {len(c_bytes)} bytes, not the student's response text "
            f"({len(repair.text_bytes)} bytes): re-encode response_text(student_ids, student_table) with the "
            "student tokenizer, without special tokens."
        )
    if c_ids.size == 0:
        return np.zeros(s_ids.size, dtype=bool)  # an empty text: no token to judge
    start_text, end_text = repair.to_text(s_starts), repair.to_text(s_ends)
    j = np.minimum(np.searchsorted(c_starts, start_text, side="left"), c_ids.size - 1)
    same = (c_starts[j] == start_text) & (c_ends[j] == end_text) & (c_ids[j] == s_ids)
    return ~same & ~repair.touches(s_starts, s_ends)


def _chunk_last_tokens(chunk_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the last student token of each kept chunk; validates ``chunk_ids``.

    Raises:
        ValueError: chunk ids outside the response mask, ``>= T``, not contiguous or not increasing.
    """
    mask = response_mask.detach().bool()
    ids = chunk_ids.detach().to(torch.long)
    kept = ids >= 0
    if (kept & ~mask).any():
        raise ValueError("chunk_ids has a chunk index where response_mask is 0: use -1 on padding.")
    if (ids >= ids.shape[1]).any():
        raise ValueError(
            f"chunk_ids must be < response_length ({ids.shape[1]}): number the chunks of each row 0, 1, 2, ..."
        )
    following = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    last = kept & (following != ids)
    end_ids = torch.where(last, ids, torch.full_like(ids, -1))
    before = torch.cat([torch.full_like(ids[:, :1], -1), torch.cummax(end_ids, dim=1).values[:, :-1]], dim=1)
    if (last & (ids <= before)).any():
        raise ValueError(
            "chunk_ids must number each row's chunks in increasing order, each chunk one contiguous run of "
            "tokens (a chunk split by a hole or out of order cannot be credited)."
        )
    return last


def chunk_rewards(
    student_log_probs: torch.Tensor,
    teacher_chunk_log_probs: torch.Tensor,
    chunk_ids: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float = 1.0,
) -> torch.Tensor:
    """Per-chunk KL reward ``r_c = -kl_coef * (S_c - T_c)`` on each kept chunk's last student token, 0 elsewhere.

    The chunk analogue of :func:`~verl_opd.core.advantage.opd_token_rewards` (same sign: positive
    where the teacher gives the chunk's text more probability than the student did); with one-token
    chunks it is exactly that function's output. ``S_c`` is summed in float64, so a one-token chunk's
    sum is its own log-prob bit for bit.

    Args:
        student_log_probs: ``(B, T)`` student log-probs of the sampled tokens.
        teacher_chunk_log_probs: ``(B, T)``, ``T_c`` on each chunk's last student token (other
            positions are not read); see :meth:`ChunkAlignment.teacher_log_probs_on_student`.
        chunk_ids: ``(B, T)`` integer chunk index of each student token, -1 on masked chunks and
            padding; each chunk a contiguous run, indices increasing along the row and ``< T``.
        response_mask: ``(B, T)``, nonzero on sampled response tokens.
        kl_coef: weight of the reverse-KL reward, finite and >= 0.

    Returns:
        ``(B, T)`` float32 rewards, detached.
    """
    _check_same_2d(
        student_log_probs=student_log_probs,
        teacher_chunk_log_probs=teacher_chunk_log_probs,
        chunk_ids=chunk_ids,
        response_mask=response_mask,
    )
    last = _chunk_last_tokens(chunk_ids, response_mask)
    ids = chunk_ids.detach().to(torch.long)
    kept = ids >= 0
    index_ = ids.clamp(min=0)
    log_probs = student_log_probs.detach()
    zero64 = torch.zeros((), dtype=torch.float64, device=log_probs.device)
    per_token = torch.where(kept, log_probs.to(torch.float64), zero64)
    chunk_sums = torch.zeros_like(per_token).scatter_add_(1, index_, per_token)
    work_dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    student_chunk = chunk_sums.gather(1, index_).to(work_dtype)
    return opd_token_rewards(student_chunk, teacher_chunk_log_probs, last, kl_coef=kl_coef)


def advantage_from_chunk_rewards(
    rewards: torch.Tensor,
    chunk_ids: torch.Tensor,
    response_mask: torch.Tensor,
    discount: float = 0.0,
    sequence_rewards: torch.Tensor | None = None,
    task_reward_coef: float = 0.0,
    index: Sequence[Hashable] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_t = G_{c(t)} + task_reward_coef * (R - b)`` from chunk rewards ``r_c`` on chunks' last tokens.

    ``G_c = r_c + discount * G_{c'}`` with ``c'`` the next *kept* chunk: the discount counts kept
    chunks, masked chunks are skipped and get no KL advantage. Every student token of a chunk gets
    the chunk's return (broadcast), the score-function estimator of the chunk's log-ratio. The task
    part is a per-sequence signal that does not depend on tokenisation: as in
    :func:`~verl_opd.core.advantage.compute_opd_advantage` it covers every response token, masked
    chunks included. Built from that function's pieces, so one-token chunks everywhere give bitwise
    the same tensors for every discount. What the registered ``opd`` estimator computes when verl's
    trainer passes it ``chunk_ids``.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` float32 and equal, 0 on padding.
    """
    _check_same_2d(rewards=rewards, chunk_ids=chunk_ids, response_mask=response_mask)
    last = _chunk_last_tokens(chunk_ids, response_mask)
    ids = chunk_ids.detach().to(torch.long)
    kept = ids >= 0
    index_ = ids.clamp(min=0)
    returns_at_last = discounted_reward_to_go(rewards, last, discount)
    zero = torch.zeros((), dtype=returns_at_last.dtype, device=returns_at_last.device)
    chunk_returns = torch.zeros_like(returns_at_last).scatter_add_(1, index_, torch.where(last, returns_at_last, zero))
    advantages = torch.where(kept, chunk_returns.gather(1, index_), zero)
    return with_task_advantage(advantages, response_mask, sequence_rewards, task_reward_coef, index)


def compute_xtok_opd_advantage(
    student_log_probs: torch.Tensor,
    teacher_chunk_log_probs: torch.Tensor,
    chunk_ids: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float = 1.0,
    discount: float = 0.0,
    sequence_rewards: torch.Tensor | None = None,
    task_reward_coef: float = 0.0,
    index: Sequence[Hashable] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk OPD advantages in the student's geometry: :func:`chunk_rewards` then :func:`advantage_from_chunk_rewards`.

    ``d_c = S_c - T_c``, ``r_c = -kl_coef * d_c``, ``G_c = r_c + discount * G_{c'}``,
    ``A_t = G_{c(t)} + task_reward_coef * (R - b)``. Positive where the teacher prefers the chunk's text.
    Arguments as in those two functions and :func:`~verl_opd.core.advantage.compute_opd_advantage`.

    Raises:
        ValueError: on shape mismatches, invalid coefficients, or chunk ids that are outside the
            response mask, not contiguous, not increasing, or ``>= T``.
    """
    rewards = chunk_rewards(student_log_probs, teacher_chunk_log_probs, chunk_ids, response_mask, kl_coef)
    return advantage_from_chunk_rewards(
        rewards, chunk_ids, response_mask, discount, sequence_rewards, task_reward_coef, index
    )


def _metrics(
    student_per: np.ndarray, teacher_per: np.ndarray, reasons: np.ndarray, n_noncanonical: int
) -> dict[str, float]:
    """``opd/xtok/*`` from per-chunk student and teacher token counts and mask reasons (see :func:`chunk_metrics`)."""
    prefix = "opd/xtok/"
    keys = [
        "one_to_one_chunk_frac",
        "student_tokens_per_chunk",
        "teacher_tokens_per_chunk",
        "masked_token_frac",
        *(f"masked_token_frac/{name}" for name in MASK_REASONS.values()),
        "noncanonical_token_frac",
        "teacher_student_length_ratio",
    ]
    n_student = int(student_per.sum())
    if student_per.size == 0 or n_student == 0:
        return {prefix + key: 0.0 for key in keys}
    out = {
        "one_to_one_chunk_frac": float(np.mean((student_per == 1) & (teacher_per == 1))),
        "student_tokens_per_chunk": float(student_per.mean()),
        "teacher_tokens_per_chunk": float(teacher_per.mean()),
        "masked_token_frac": float(student_per[reasons != KEPT].sum() / n_student),
        "noncanonical_token_frac": n_noncanonical / n_student,
        "teacher_student_length_ratio": float(teacher_per.sum() / n_student),
    }
    for code, name in MASK_REASONS.items():
        out[f"masked_token_frac/{name}"] = float(student_per[reasons == code].sum() / n_student)
    return {prefix + key: out[key] for key in keys}


def chunk_metrics(alignments: Sequence[ChunkAlignment]) -> dict[str, float]:
    """``opd/xtok/*`` numbers for a batch of alignments (one per response).

    ``one_to_one_chunk_frac``: chunks with exactly one student and one teacher token (1.0
    for identical tokenizers). ``student_tokens_per_chunk``, ``teacher_tokens_per_chunk``:
    means over chunks. ``masked_token_frac``: student tokens in masked chunks over all
    student tokens (they get no KL signal), and ``masked_token_frac/<reason>`` per reason.
    ``noncanonical_token_frac``: flagged student tokens over all student tokens (design
    target <= 1%, not rising). ``teacher_student_length_ratio``: teacher tokens over student
    tokens, batch totals. All 0.0 for a batch without tokens.
    """
    if not alignments:
        return _metrics(np.zeros(0), np.zeros(0), np.zeros(0), 0)
    return _metrics(
        np.concatenate([a.student_tokens_per_chunk for a in alignments]),
        np.concatenate([a.teacher_tokens_per_chunk for a in alignments]),
        np.concatenate([a.mask_reason for a in alignments]),
        sum(a.n_noncanonical for a in alignments),
    )


def token_chunk_metrics(
    chunk: torch.Tensor,
    reason: torch.Tensor,
    teacher_n: torch.Tensor,
    noncanonical: torch.Tensor,
    response_mask: torch.Tensor,
) -> dict[str, float]:
    """:func:`chunk_metrics` from the per-token fields the teacher worker writes back (padded ``(B, T)``).

    ``chunk``: each student token's chunk index (masked chunks too); ``reason``: its chunk's mask
    reason; ``teacher_n``: the chunk's teacher token count on its last student token, 0 elsewhere;
    ``noncanonical``: the guard's per-token flag.
    """
    mask = response_mask.detach().bool()
    ids = chunk.detach().long()
    following = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    following_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    last = mask & ((following != ids) | ~following_mask)
    # A chunk's student count: tokens of the row with its index, read at its last token.
    width = ids.shape[1] + 1
    flat = (ids.clamp(min=0) + width * torch.arange(ids.shape[0]).unsqueeze(1))[mask]
    counts = torch.bincount(flat, minlength=width * ids.shape[0])
    at_last = (ids.clamp(min=0) + width * torch.arange(ids.shape[0]).unsqueeze(1))[last]
    return _metrics(
        counts[at_last].numpy(),
        teacher_n.detach().long()[last].numpy(),
        reason.detach().long()[last].numpy(),
        int(noncanonical.detach().long()[mask].sum()),
    )


def shaping_metrics(shift: torch.Tensor, teacher_n: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """``opd/xtok/shaping_shift_abs_mean``: the mean over chunks of |ΔΦ_S - ΔΦ_T| the shaping moved (0 when off).

    ``shift`` and ``teacher_n`` sit on each chunk's last student token (``teacher_n > 0`` marks it), as the
    teacher worker writes them back. How far the boundary lookahead moved the chunk scores: 0 for identical
    tokenisers under one model, and the size of the correction the plain estimator would have missed.
    """
    last = response_mask.bool() & (teacher_n > 0)
    value = float(shift.detach().double()[last].abs().mean()) if bool(last.any()) else 0.0
    return {"opd/xtok/shaping_shift_abs_mean": value}
