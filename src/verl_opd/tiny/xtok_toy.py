"""The exact cross-tokenizer toy (``shared/design/cross-tokenizer-opd.md`` §1 C, §4 T2): no sampling anywhere.

One distribution P over 120 short strings (``ab``-prefix? digit run over {1, 2} of length 1-4, ``b``-suffix?)
is written as two autoregressive language models over two tokenizers:

* the student's tokenizer A is Qwen-like: its pre-tokenizer isolates every digit (vocabulary a, b, ab, 1, 2);
* the teacher's tokenizer B is Llama-3-like: digits go in groups of up to 3 (every 1-3 digit string is a token).

A *canonical-trie* LM over tokenizer X gives the canonical encoding ``κ_X(s) + [EOS]`` probability P(s)
and every other token sequence probability 0; its conditionals are ratios of prefix masses. The teacher is
that LM over B. The student is a free softmax per node of the trie of EVERY tokenization of the strings over
A (``[a][b]`` for ``ab`` too, the non-canonical split bias A exploits), initialised at or near the
canonical-trie LM over A. Its string marginal equals the teacher's exactly at the optimum, yet chunk
log-ratios there are nonzero wherever B's "12" asserts that the run ends (bias C).

Expected advantages and policy gradients are exact sums over the student's finite support, through the
project's own chunking (:func:`verl_opd.core.xtok.align_chunks`), canonicity guard, advantage
(:func:`verl_opd.core.xtok.compute_xtok_opd_advantage`) and shaping (:mod:`verl_opd.core.xtok_shaping`).
The student's tokens carry no lookahead here (no A token extends a digit, ``b`` or ``ab``, and ``a`` is never
a chunk's last token), so ``Phi_S = 0`` and teacher-side shaping alone is exact in this toy.

Used by ``tests/test_xtok_toy.py`` and ``benchmarks/xtok_toy.py``. numpy/torch only.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from verl_opd.core.xtok import align_chunks, compute_xtok_opd_advantage, noncanonical_tokens
from verl_opd.core.xtok_shaping import (
    ExtensionTable,
    extension_log_mass,
    extension_table,
    potential_shift,
    teacher_potential,
)

__all__ = ["ToyTokenizer", "QWEN_LIKE", "LLAMA3_LIKE", "toy_distribution", "CanonicalTrieLM", "ExactToy"]

EOS_BYTES = b"<|eos|>"


@dataclass(frozen=True)
class ToyTokenizer:
    """A regex pre-tokenizer plus a vocabulary; canonical encoding = longest match inside each pre-token.

    For these vocabularies every pre-token of the toy strings is spelled by longest match exactly as a
    BPE with the obvious merges would spell it. The EOS id is ``len(vocab)``; its byte-table entry is its
    tag's spelling and it is special (zero text bytes), as the contract's byte tables have it.
    """

    pattern: bytes
    vocab: tuple[bytes, ...]

    @property
    def eos_id(self) -> int:
        return len(self.vocab)

    @property
    def byte_table(self) -> tuple[bytes, ...]:
        return (*self.vocab, EOS_BYTES)

    @cached_property
    def _ids(self) -> dict[bytes, int]:
        return {token: i for i, token in enumerate(self.vocab)}

    def encode(self, text: bytes) -> tuple[int, ...]:
        """Canonical token ids of ``text`` (no EOS)."""
        ids: list[int] = []
        for piece in re.findall(self.pattern, text):
            while piece:
                size = max(n for n in range(1, len(piece) + 1) if piece[:n] in self._ids)
                ids.append(self._ids[piece[:size]])
                piece = piece[size:]
        if b"".join(self.vocab[i] for i in ids) != text:
            raise ValueError(f"{text!r} is not covered by the pre-tokenizer {self.pattern!r}.")
        return tuple(ids)

    def segmentations(self, text: bytes) -> list[tuple[int, ...]]:
        """Every sequence of vocabulary ids whose bytes are ``text`` (the canonical one among them)."""
        if not text:
            return [()]
        return [
            (self._ids[text[:n]], *rest)
            for n in range(1, len(text) + 1)
            if text[:n] in self._ids
            for rest in self.segmentations(text[n:])
        ]


_DIGITS = "12"
QWEN_LIKE = ToyTokenizer(pattern=rb"[a-z]+|[0-9]", vocab=(b"a", b"b", b"ab", *(d.encode() for d in _DIGITS)))
LLAMA3_LIKE = ToyTokenizer(
    pattern=rb"[a-z]+|[0-9]{1,3}",
    vocab=(
        b"a",
        b"b",
        b"ab",
        *("".join(group).encode() for n in (1, 2, 3) for group in itertools.product(_DIGITS, repeat=n)),
    ),
)


def toy_distribution(seed: int) -> dict[bytes, float]:
    """P over the 120 strings ``[ab] + run + [b]`` (run: 1-4 digits over {1, 2}), log-normal weights."""
    runs = ["".join(r) for n in range(1, 5) for r in itertools.product(_DIGITS, repeat=n)]
    strings = [f"{pre}{run}{post}".encode() for pre in ("", "ab") for run in runs for post in ("", "b")]
    weights = np.exp(np.random.default_rng(seed).normal(size=len(strings)))
    return dict(zip(strings, (weights / weights.sum()).tolist(), strict=True))


class CanonicalTrieLM:
    """The autoregressive LM over ``tokenizer`` that puts P(s) on ``κ(s) + [EOS]`` and 0 elsewhere."""

    def __init__(self, tokenizer: ToyTokenizer, probs: dict[bytes, float]) -> None:
        self.tokenizer = tokenizer
        self.mass: dict[tuple[int, ...], float] = {}
        for text, p in probs.items():
            ids = (*tokenizer.encode(text), tokenizer.eos_id)
            for end in range(len(ids) + 1):
                self.mass[ids[:end]] = self.mass.get(ids[:end], 0.0) + p

    def next_log_probs(self, prefix: tuple[int, ...]) -> np.ndarray:
        """``log P(v | prefix)`` for every id v (``-inf`` off the support)."""
        children = np.array([self.mass.get((*prefix, v), 0.0) for v in range(len(self.tokenizer.byte_table))])
        with np.errstate(divide="ignore"):
            return np.log(children / self.mass[prefix])


@dataclass(frozen=True)
class _Leaf:
    """One student token sequence (EOS last) with its fixed teacher-side chunk data."""

    text: bytes
    ids: tuple[int, ...]
    canonical: bool
    student_chunk: np.ndarray  # chunk index per student token
    chunk_ids: dict[bool, np.ndarray]  # guard -> per student token chunk index, -1 in masked chunks
    teacher_on_student: dict[bool, np.ndarray]  # shaping -> T_c (or T_c - shift_c) on each chunk's last token
    teacher_chunk_lp: np.ndarray  # T_c per chunk
    potential_shift: np.ndarray  # ΔPhi_S - ΔPhi_T per chunk (Phi_S = 0: teacher-side shaping)


class ExactToy:
    """The student trie, the teacher, and exact expected advantages / gradients / distances.

    Student parameters are ``logits (n_nodes, max_children)`` in float64, ``-inf`` in unused slots.
    """

    def __init__(self, teacher_probs: dict[bytes, float]) -> None:
        self.probs = teacher_probs
        self.student_tok, self.teacher_tok = QWEN_LIKE, LLAMA3_LIKE
        teacher = CanonicalTrieLM(self.teacher_tok, teacher_probs)
        teacher_ext = extension_table(self.teacher_tok.byte_table, special_ids={self.teacher_tok.eos_id})
        self.leaves = [
            self._leaf(text, ids, teacher, teacher_ext)
            for text in teacher_probs
            for ids in self.student_tok.segmentations(text)
        ]
        # The student trie: a node per proper prefix of a leaf, its children in first-seen order.
        nodes: dict[tuple[int, ...], int] = {}
        self.children: list[list[int]] = []
        for leaf in self.leaves:
            for t, token in enumerate(leaf.ids):
                node = nodes.setdefault(leaf.ids[:t], len(nodes))
                if node == len(self.children):
                    self.children.append([])
                if token not in self.children[node]:
                    self.children[node].append(token)
        self._prefixes = list(nodes)
        self.width = max(len(kids) for kids in self.children)
        shape = (len(self.leaves), max(len(leaf.ids) for leaf in self.leaves))
        self.node = torch.zeros(shape, dtype=torch.long)  # (L, T): trie node each token is chosen at
        self.slot = torch.zeros(shape, dtype=torch.long)  # (L, T): its slot among that node's children
        self.mask = torch.zeros(shape, dtype=torch.bool)
        for row, leaf in enumerate(self.leaves):
            for t, token in enumerate(leaf.ids):
                node = nodes[leaf.ids[:t]]
                self.node[row, t], self.slot[row, t] = node, self.children[node].index(token)
                self.mask[row, t] = True
        texts = list(teacher_probs)
        self.text_index = torch.tensor([texts.index(leaf.text) for leaf in self.leaves])
        self.target = torch.tensor([teacher_probs[t] for t in texts], dtype=torch.float64)
        self.canonical = torch.tensor([leaf.canonical for leaf in self.leaves])

    def _leaf(self, text: bytes, ids: tuple[int, ...], teacher: CanonicalTrieLM, teacher_ext: ExtensionTable) -> _Leaf:
        """Chunk one student tokenization against the teacher's canonical one and score the teacher side."""
        student_ids = np.array([*ids, self.student_tok.eos_id])
        teacher_ids = (*self.teacher_tok.encode(text), self.teacher_tok.eos_id)
        noncanonical = noncanonical_tokens(ids, self.student_tok.encode(text), self.student_tok.byte_table)
        alignments = {
            guard: align_chunks(
                student_ids,
                teacher_ids,
                self.student_tok.byte_table,
                self.teacher_tok.byte_table,
                student_eos=True,
                teacher_eot_len=1,
                truncated=False,
                noncanonical=noncanonical if guard else None,
            )
            for guard in (False, True)
        }
        alignment = alignments[False]
        next_lp = torch.tensor(np.stack([teacher.next_log_probs(teacher_ids[:u]) for u in range(len(teacher_ids))]))
        token_ids = torch.tensor(teacher_ids)
        teacher_lp = next_lp[torch.arange(len(teacher_ids)), token_ids]
        phi = teacher_potential(
            teacher_lp,
            extension_log_mass(next_lp, token_ids, teacher_ext),
            alignment.teacher_chunk,
            alignment.n_chunks,
            ends_with_eos=True,
        )
        shift = potential_shift(None, phi).numpy()
        on_student = alignment.teacher_log_probs_on_student(teacher_lp.numpy())
        last = on_student != 0  # each chunk's last student token (every T_c < 0 here)
        shaped = on_student.copy()
        shaped[last] -= shift[alignment.student_chunk[last]]
        return _Leaf(
            text=text,
            ids=tuple(student_ids.tolist()),
            canonical=not bool(noncanonical.any()),
            student_chunk=alignment.student_chunk,
            chunk_ids={guard: a.student_chunk_ids() for guard, a in alignments.items()},
            teacher_on_student={False: on_student, True: shaped},
            teacher_chunk_lp=np.bincount(alignment.teacher_chunk, weights=teacher_lp.numpy()),
            potential_shift=shift,
        )

    # ------------------------------------------------------------------ student geometry

    @cached_property
    def _chunks(self) -> dict[str, torch.Tensor]:
        """The leaves' chunk data as padded ``(L, T)`` rows and flat per-chunk vectors."""

        def rows(values: list[np.ndarray], fill: float, dtype: torch.dtype) -> torch.Tensor:
            out = torch.full(self.node.shape, fill, dtype=dtype)
            for row, value in enumerate(values):
                out[row, : len(value)] = torch.as_tensor(value, dtype=dtype)
            return out

        offsets = np.cumsum([0] + [len(leaf.teacher_chunk_lp) for leaf in self.leaves])
        return {
            "global": rows([leaf.student_chunk + offsets[i] for i, leaf in enumerate(self.leaves)], -1, torch.long),
            "teacher": torch.as_tensor(np.concatenate([leaf.teacher_chunk_lp for leaf in self.leaves])),
            "shift": torch.as_tensor(np.concatenate([leaf.potential_shift for leaf in self.leaves])),
            "row": torch.repeat_interleave(torch.arange(len(self.leaves)), torch.as_tensor(np.diff(offsets))),
            **{f"ids_{g}": rows([leaf.chunk_ids[g] for leaf in self.leaves], -1, torch.long) for g in (False, True)},
            **{
                f"teacher_{s}": rows([leaf.teacher_on_student[s] for leaf in self.leaves], 0.0, torch.float64)
                for s in (False, True)
            },
        }

    def canonical_logits(self, probs: dict[bytes, float]) -> torch.Tensor:
        """The student at the canonical-trie LM over A of ``probs``: non-canonical slots ``-inf``, and the
        nodes below them (unreachable, no canonical mass) uniform, for :meth:`open_noncanonical` to use."""
        lm = CanonicalTrieLM(self.student_tok, probs)
        logits = torch.full((len(self.children), self.width), float("-inf"), dtype=torch.float64)
        for node, prefix in enumerate(self._prefixes):
            kids = self.children[node]
            reachable = prefix in lm.mass
            logits[node, : len(kids)] = torch.as_tensor(lm.next_log_probs(prefix)[kids]) if reachable else 0.0
        return logits

    def open_noncanonical(self, logits: torch.Tensor, share: float) -> torch.Tensor:
        """``logits`` with every ``-inf`` but used slot given ``share`` of its node's current mass, relative."""
        out = logits.clone()
        for node, kids in enumerate(self.children):
            row = out[node, : len(kids)]
            closed = torch.isinf(row)
            if closed.any():
                row[closed] = torch.logsumexp(row[~closed], 0) + math.log(share)
        return out

    def token_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``(L, T)`` log-prob of every student token of every leaf, 0 on padding."""
        lp = torch.log_softmax(logits, dim=1)[self.node, self.slot]
        return torch.where(self.mask, lp, torch.zeros((), dtype=lp.dtype))

    def leaf_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.token_log_probs(logits).sum(1).exp()

    def string_tv(self, logits: torch.Tensor) -> float:
        """Total variation between the student's string marginal and the teacher's P."""
        marginal = torch.zeros_like(self.target).index_add(0, self.text_index, self.leaf_probs(logits))
        return 0.5 * (marginal - self.target).abs().sum().item()

    def noncanonical_mass(self, logits: torch.Tensor) -> float:
        return self.leaf_probs(logits)[~self.canonical].sum().item()

    def chunk_log_ratios(self, logits: torch.Tensor, shaping: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d_c or d'_c, leaf row of c)`` for every chunk of every leaf the student can produce."""
        chunks = self._chunks
        lp = self.token_log_probs(logits)
        student = torch.zeros_like(chunks["teacher"]).index_add(0, chunks["global"][self.mask], lp[self.mask])
        d = student - chunks["teacher"] + (chunks["shift"] if shaping else 0.0)
        reachable = torch.isfinite(lp.sum(1))[chunks["row"]]
        return d[reachable], chunks["row"][reachable]

    def mean_abs_chunk_log_ratio(self, logits: torch.Tensor, shaping: bool) -> float:
        """``E_{y ~ S}[mean over y's chunks of |d_c|]`` (``|d'_c|`` with ``shaping``)."""
        d, row = self.chunk_log_ratios(logits, shaping)
        per_leaf_sum = torch.zeros(len(self.leaves), dtype=torch.float64).index_add(0, row, d.abs())
        n_chunks = torch.bincount(row, minlength=len(self.leaves)).clamp_min(1)
        return (self.leaf_probs(logits) * per_leaf_sum / n_chunks).sum().item()

    def gradient(self, logits: torch.Tensor, *, guard: bool, shaping: bool, discount: float) -> torch.Tensor:
        """Exact ``E_S[sum_t A_t grad log S(y_t | y_<t)]`` w.r.t. ``logits`` (advantages held constant).

        At node n: ``W[n] - pi(n) sum W[n]``, ``W[n, a]`` = sum over leaves through edge (n, a) of
        ``S(y) A_t``: the score-function gradient of a softmax, summed exactly over the support.
        """
        lp = self.token_log_probs(logits)
        live = torch.isfinite(lp.sum(1))  # leaves the student cannot produce take no part
        chunks = self._chunks
        advantages, _ = compute_xtok_opd_advantage(
            lp[live],
            chunks[f"teacher_{shaping}"][live],
            chunks[f"ids_{guard}"][live],
            self.mask[live].to(torch.float64),
            discount=discount,
        )
        weight = torch.where(self.mask[live], advantages.to(torch.float64) * lp[live].sum(1, keepdim=True).exp(), 0.0)
        w = torch.zeros_like(logits).index_put_((self.node[live], self.slot[live]), weight, accumulate=True)
        probs = torch.softmax(logits, dim=1)
        return w - probs * w.sum(1, keepdim=True)

    def reach(self, logits: torch.Tensor) -> torch.Tensor:
        """``(n_nodes,)`` probability that the student passes through each trie node."""
        weight = torch.where(self.mask, self.leaf_probs(logits).unsqueeze(1), 0.0)
        return torch.zeros(len(self.children), dtype=torch.float64).index_put_((self.node,), weight, accumulate=True)

    def train(
        self, logits: torch.Tensor, *, steps: int, lr: float, guard: bool, shaping: bool, discount: float = 0.0
    ) -> torch.Tensor:
        """Exact-gradient ascent, each node's step divided by its reach probability.

        The division (a per-node Fisher-style preconditioner) makes rarely visited nodes learn as fast as the
        root without changing any fixed point: a node's gradient is zero exactly when its scaled one is.
        """
        for _ in range(steps):
            grad = self.gradient(logits, guard=guard, shaping=shaping, discount=discount)
            logits = logits + lr * grad / self.reach(logits).clamp_min(1e-300).unsqueeze(1)
        return logits
