"""Exact bytes of token ids, and token ids of exact bytes, for byte-level BPE tokenizers.

With ``opd.teacher.view=own`` the student's and the teacher's tokens are aligned on the bytes of the
response, never on decoded strings: a token may hold half of a UTF-8 character ("naïve" is
``[a\\xc3][\\xafve]`` in both tiny tokenizers), which ``decode`` turns into U+FFFD. Byte-level BPE
(GPT-2's scheme: Qwen, Llama-3, DeepSeek-V3) stores each vocabulary piece as one printable character per
byte, so the inverse of that byte-to-character map gives every id's bytes exactly. Other schemes
(SentencePiece's ``▁`` pieces and dummy prefix, WordPiece's ``##``, normalizers that rewrite the text) have
no such map and are refused by :func:`check_byte_level`.

Encoding goes through :class:`ByteEncoder`, a copy of the tokenizer's own ``tokenizers`` pipeline without
its normalizer (NFC, the only one accepted, is the identity on NFC text; on other text the encoding still
spells the exact bytes the student produced) and without its post-processor (no bos token inside a
response). Invalid UTF-8 (a response cut inside a character, stray bytes) cannot be given to a tokenizer
as text: it is decoded with ``errors="surrogateescape"``, the valid runs are encoded as text and each
invalid byte becomes that byte's own token (every byte-level vocabulary has all 256). The ids returned
therefore always spell exactly the input bytes, which :meth:`ByteEncoder.encode` asserts.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
_CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in _BYTE_TO_CHAR.items()}
# Normalizers whose output equals their input on the text they are trained on (NFC text).
_ACCEPTED_NORMALIZERS = ("NFC",)
# What ``bytes.decode(errors="surrogateescape")`` maps an undecodable byte b to: chr(0xDC00 + b).
_ESCAPED_BYTE = re.compile("([\udc80-\udcff])")
_FIX = "use a teacher that shares the student's tokenizer, with opd.teacher.view=student"


class NotByteLevelError(ValueError):
    """A tokenizer whose token ids cannot be mapped to exact bytes; the message says why and the fix."""


def _pipeline(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's ``tokenizers`` pipeline as JSON (model, normalizer, pre-tokenizer, ...)."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _node_types(node: dict[str, Any] | None, members: str) -> list[dict[str, Any]]:
    """A pipeline step and, for a ``Sequence``, its members (``members`` names their list)."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(members, []) for leaf in _node_types(child, members)]
    return [node]


def byte_level_problems(tokenizer: Any) -> list[str]:
    """Why the ids of ``tokenizer`` do not map to exact bytes of the text (empty for byte-level BPE)."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        return [f"{type(tokenizer).__name__} is a slow (Python) tokenizer with no `tokenizers` pipeline to read"]
    pipeline = _pipeline(tokenizer)
    problems = []
    model_type = pipeline["model"].get("type")
    if model_type != "BPE":
        problems.append(f"its model is {model_type}, not BPE")
    pre_tokenizers = _node_types(pipeline.get("pre_tokenizer"), "pretokenizers")
    byte_levels = [step for step in pre_tokenizers if step.get("type") == "ByteLevel"]
    if not byte_levels:
        kinds = [step.get("type") for step in pre_tokenizers]
        problems.append(
            f"its pre-tokenizer ({kinds or 'none'}) has no ByteLevel step, so its pieces are not the text's bytes "
            "(SentencePiece-style tokenizers write spaces as '▁' and may add a dummy prefix)"
        )
    elif any(step.get("add_prefix_space") for step in byte_levels):
        problems.append("its ByteLevel pre-tokenizer adds a space in front of the text (add_prefix_space=True)")
    normalizers = [step.get("type") for step in _node_types(pipeline.get("normalizer"), "normalizers")]
    rewriting = [kind for kind in normalizers if kind not in _ACCEPTED_NORMALIZERS]
    if rewriting:
        problems.append(f"its normalizer ({rewriting}) rewrites the text before it is split")
    vocab = tokenizer.get_vocab()
    missing = [byte for byte, char in _BYTE_TO_CHAR.items() if char not in vocab]
    if model_type == "BPE" and byte_levels and missing:
        problems.append(f"{len(missing)} of the 256 single-byte pieces are not in its vocabulary")
    stripping = [t.content for t in tokenizer.added_tokens_decoder.values() if t.lstrip or t.rstrip]
    if stripping:
        problems.append(f"its added tokens {stripping[:3]} swallow the whitespace next to them (lstrip/rstrip)")
    return problems


def check_byte_level(tokenizer: Any, role: str) -> None:
    """Raise :class:`NotByteLevelError` naming why the ``role`` tokenizer is not byte-level BPE, and the fix."""
    problems = byte_level_problems(tokenizer)
    if problems:
        raise NotByteLevelError(
            f"opd.teacher.view=own aligns the student's and the teacher's tokens on the bytes of the text, which "
            f"needs byte-level BPE tokenizers (Qwen, Llama-3, DeepSeek-V3), but the {role} tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')}) is not: {'; '.join(problems)}. Fix: {_FIX}."
        )


def added_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the added tokens (special or not: ``<|im_end|>``, ``<think>``): their bytes are their string's."""
    return frozenset(tokenizer.added_tokens_decoder)


def byte_table(tokenizer: Any) -> list[bytes]:
    """The exact bytes of every id of a byte-level BPE ``tokenizer`` (added tokens: their UTF-8 string).

    Index ``i`` holds id ``i``'s bytes; ids the tokenizer does not define (none in real tokenizers, whose
    ids are contiguous) are refused, since a sampled one could not be aligned.
    """
    check_byte_level(tokenizer, "given")
    added = {idx: token.content for idx, token in tokenizer.added_tokens_decoder.items()}
    vocab = tokenizer.get_vocab()
    table: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for piece, idx in vocab.items():
        table[idx] = added[idx].encode("utf-8") if idx in added else bytes(_CHAR_TO_BYTE[char] for char in piece)
    holes = [idx for idx, value in enumerate(table) if value is None]
    if holes:
        raise NotByteLevelError(f"ids {holes[:5]} of tokenizer {tokenizer.name_or_path!r} have no vocabulary entry")
    return table  # type: ignore[return-value]  # no None left


class ByteEncoder:
    """Encodes exact bytes with a byte-level BPE tokenizer's own merges; the ids always spell those bytes.

    ``special_tokens_as_text=True`` encodes a special token's string found in the bytes as ordinary text
    (``tokenizers``' ``encode_special_tokens``): what the teacher uses, so that a student writing
    ``<|eot_id|>`` does not end the teacher's turn. Non-special added tokens (``<think>``) still match.
    """

    def __init__(self, tokenizer: Any, *, special_tokens_as_text: bool = False) -> None:
        self.table = byte_table(tokenizer)
        self.special_ids = added_token_ids(tokenizer)
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.normalizer = None
        backend.post_processor = None
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = special_tokens_as_text
        self._backend = backend
        vocab = tokenizer.get_vocab()
        self._byte_ids = [vocab[_BYTE_TO_CHAR[byte]] for byte in range(256)]

    def _parts(self, data: bytes) -> list[str | int]:
        """``data`` as valid text runs (str) and invalid bytes (their single-byte token id), in order."""
        parts: list[str | int] = []
        for index, run in enumerate(_ESCAPED_BYTE.split(data.decode("utf-8", errors="surrogateescape"))):
            if index % 2:
                parts.append(self._byte_ids[ord(run) - 0xDC00])
            elif run:
                parts.append(run)
        return parts

    def encode_batch(self, items: Sequence[bytes]) -> list[list[int]]:
        """The ids of each item (one ``encode_batch`` call into ``tokenizers`` for all their text runs)."""
        parts = [self._parts(data) for data in items]
        texts = [part for item in parts for part in item if isinstance(part, str)]
        encoded = iter(self._backend.encode_batch(texts, add_special_tokens=False))
        result = []
        for data, item in zip(items, parts, strict=True):
            ids = [i for part in item for i in ([part] if isinstance(part, int) else next(encoded).ids)]
            spelled = b"".join(self.table[i] for i in ids)
            if spelled != data:
                raise ValueError(f"re-encoding {data!r} gave ids {ids} spelling {spelled!r}, not the same bytes")
            result.append(ids)
        return result

    def encode(self, data: bytes) -> list[int]:
        """The ids of ``data``: the tokenizer's own encoding of its text, invalid bytes as single-byte tokens."""
        return self.encode_batch([data])[0]


_STUDENT_ENCODERS: weakref.WeakKeyDictionary[Any, ByteEncoder] = weakref.WeakKeyDictionary()


def canonical_ids(tokenizer: Any, response_bytes: bytes) -> list[int]:
    """The student tokenizer's own encoding of a response's bytes: what the guard compares sampled ids with.

    A sampled sequence that differs from it is a non-canonical split of the same text
    (:func:`verl_opd.core.xtok.noncanonical_tokens`). The encoder is built once per tokenizer object.
    """
    if tokenizer not in _STUDENT_ENCODERS:
        _STUDENT_ENCODERS[tokenizer] = ByteEncoder(tokenizer)
    return _STUDENT_ENCODERS[tokenizer].encode(response_bytes)


def round_trip_problems(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """Probe texts on which the byte table or :class:`ByteEncoder` disagree with ``tokenizer`` (empty: none).

    For each text, the tokenizer's own ids must spell its UTF-8 bytes through :func:`byte_table`, and
    :class:`ByteEncoder` must give those same ids; an invalid-UTF-8 probe must round-trip too.
    """
    encoder = ByteEncoder(tokenizer)
    problems = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        spelled = b"".join(encoder.table[i] for i in ids)
        if spelled != text.encode("utf-8"):
            problems.append(f"{text!r}: its ids spell {spelled!r}")
        elif encoder.encode(text.encode("utf-8")) != ids:
            problems.append(f"{text!r}: the byte encoder's ids differ from the tokenizer's {ids}")
    for data in (b"cut \xe2\x82", b"\xff stray \xc3 bytes \xa9"):
        try:
            encoder.encode(data)
        except ValueError as exc:
            problems.append(str(exc))
    return problems
