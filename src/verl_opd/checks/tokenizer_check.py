"""Do student and teacher tokenize the same text into the same ids?

OPD scores the student's token ids with the teacher. If the two tokenizers map
text to different ids, use different special tokens or render chats differently,
the teacher scores tokens it never meant, and training silently optimises a
biased target. These checks load only the tokenizers (seconds, no GPU) and
compare ids, not just vocabulary sizes.

With ``opd.teacher.view=own`` the tokenizers may differ; :func:`own_view_checks` instead checks what
aligning them on bytes needs (both byte-level BPE, exact byte tables, a findable teacher end of turn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from verl_opd.teacher_view.render import config_json_value

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 37 + 48? Answer with #### and the number. #### 85",
    "def f(x):\n    return x ** 2  # squares\n",
    "Ünïcödé — “quotes”, emoji 🙂, 中文, العربية.",
    "   leading spaces\ttabs\nnewlines\r\n",
    "1234567890 3.14159 -42 1e-9",
)
PROBE_CHAT = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "#### 42"},
)


@dataclass(frozen=True)
class TokenizerCheck:
    """One comparison: its name, whether it passed, and what to do if not."""

    name: str
    passed: bool
    detail: str


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers disagree; the message lists every difference."""


def _load(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _special_tokens(tokenizer: Any) -> dict[str, tuple[str | None, int | None]]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {name: (getattr(tokenizer, name), getattr(tokenizer, f"{name}_id")) for name in names}


def own_view_checks(student_path: str, teacher_path: str) -> list[TokenizerCheck]:
    """What ``opd.teacher.view=own`` needs of the pair; never raises for a failure (see
    :func:`assert_own_view_supported`)."""
    from verl_opd.teacher_view.byte_tables import byte_level_problems, round_trip_problems
    from verl_opd.teacher_view.render import TeacherView, model_type, teacher_end_of_turn

    student, teacher = _load(student_path), _load(teacher_path)
    checks: list[TokenizerCheck] = []
    for role, tokenizer in (("student", student), ("teacher", teacher)):
        problems = byte_level_problems(tokenizer)
        checks.append(
            TokenizerCheck(
                f"{role} tokenizer is byte-level BPE",
                not problems,
                "token ids map to exact bytes" if not problems else "; ".join(problems),
            )
        )
        if problems:
            continue
        mismatches = round_trip_problems(tokenizer, PROBE_TEXTS)
        checks.append(
            TokenizerCheck(
                f"{role} byte table round trip",
                not mismatches,
                f"{len(PROBE_TEXTS)} probe texts and invalid UTF-8 spelled exactly"
                if not mismatches
                else "; ".join(mismatches),
            )
        )
    checks.append(
        TokenizerCheck(
            "student eos token",
            student.eos_token_id is not None,
            f"{student.eos_token!r} pairs with the teacher's end of turn"
            if student.eos_token_id is not None
            else "the student tokenizer has no eos token: the end of its responses cannot be paired",
        )
    )
    try:
        end_of_turn = teacher_end_of_turn(teacher)
        prompt = TeacherView(teacher, hf_model_type=model_type(teacher_path)).prompt_ids(list(PROBE_CHAT[:2]))
        student_prompt = TeacherView(student, hf_model_type=model_type(student_path)).prompt_ids(list(PROBE_CHAT[:2]))
    except ValueError as exc:
        checks.append(TokenizerCheck("teacher chat template", False, str(exc)))
    else:
        checks.append(
            TokenizerCheck(
                "teacher chat template",
                True,
                f"end of turn {teacher.convert_ids_to_tokens(end_of_turn)}; the probe prompt renders as "
                f"{teacher.decode(prompt)!r} for the teacher, {student.decode(student_prompt)!r} for the student",
            )
        )
    same = _same_pipeline(student, teacher)
    checks.append(
        TokenizerCheck(
            "boundary-lookahead shaping",
            True,
            "the tokenizers are identical: opd.teacher.shaping=auto shapes nothing (every chunk is one token)"
            if same
            else "the tokenizers differ: opd.teacher.shaping=auto adds both models' potentials (one more student "
            "forward per step)",
        )
    )
    return checks


def assert_own_view_supported(student_path: str, teacher_path: str) -> None:
    """Raise :class:`TokenizerMismatchError` naming every ``opd.teacher.view=own`` requirement the pair fails."""
    _raise_failed(
        own_view_checks(student_path, teacher_path),
        f"opd.teacher.view=own cannot align the teacher ({teacher_path}) with the student ({student_path}):",
        "It aligns both tokenizations on the bytes of the text, which needs byte-level BPE tokenizers "
        "(Qwen, Llama-3, DeepSeek-V3). Fix: use a teacher that shares the student's tokenizer, with "
        "opd.teacher.view=student.",
    )


def _raise_failed(checks: list[TokenizerCheck], headline: str, fix: str) -> None:
    """Raise :class:`TokenizerMismatchError` listing every failed check under ``headline``, then ``fix``."""
    failed = [c for c in checks if not c.passed]
    if failed:
        lines = "\n".join(f"  - {c.name}: {c.detail}" for c in failed)
        raise TokenizerMismatchError(f"{headline}\n{lines}\n{fix}")


def same_tokenization(student_path: str, teacher_path: str) -> bool:
    """True when both tokenizers turn every text into the same ids: same normaliser, pre-tokeniser, model and
    added tokens in their ``tokenizer.json`` (the chat template is not part of it).

    Probe texts could agree where merges differ; the serialised pipeline cannot.
    """
    return _same_pipeline(_load(student_path), _load(teacher_path))


def _same_pipeline(student: Any, teacher: Any) -> bool:  # noqa: ANN401 - Hugging Face fast tokenizers
    """:func:`same_tokenization` of two loaded tokenizers."""
    parts = ("normalizer", "pre_tokenizer", "model", "added_tokens")
    specs = [json.loads(t.backend_tokenizer.to_str()) for t in (student, teacher)]
    return all(specs[0].get(part) == specs[1].get(part) for part in parts)


def compare_tokenizers(student_path: str, teacher_path: str) -> list[TokenizerCheck]:
    """Run every check; never raises for a mismatch (see :func:`assert_compatible_tokenizers`)."""
    student, teacher = _load(student_path), _load(teacher_path)
    checks: list[TokenizerCheck] = []

    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    moved = [tok for tok, idx in student_vocab.items() if teacher_vocab.get(tok) != idx]
    checks.append(
        TokenizerCheck(
            "vocabulary ids",
            not moved,
            "every student token has the same id in the teacher"
            if not moved
            else f"{len(moved)} of {len(student_vocab)} student tokens are missing from the teacher or have another "
            f"id (e.g. {moved[:3]}); vocab sizes {len(student_vocab)} vs {len(teacher_vocab)}",
        )
    )

    teacher_rows = config_json_value(teacher_path, "vocab_size")
    max_student_id = max(student_vocab.values())
    fits = teacher_rows is None or max_student_id < teacher_rows
    checks.append(
        TokenizerCheck(
            "teacher embedding covers student ids",
            fits,
            f"largest student id {max_student_id} < teacher vocab_size {teacher_rows}"
            if fits
            else f"student can emit id {max_student_id} but the teacher model has only {teacher_rows} rows",
        )
    )

    differing = [text for text in PROBE_TEXTS if student.encode(text) != teacher.encode(text)]
    checks.append(
        TokenizerCheck(
            "probe texts encode to the same ids",
            not differing,
            f"{len(PROBE_TEXTS)} probe texts identical"
            if not differing
            else f"{len(differing)} probe texts encode differently, e.g. {differing[0]!r}",
        )
    )

    student_special, teacher_special = _special_tokens(student), _special_tokens(teacher)
    special_diff = {
        k: (student_special[k], teacher_special[k]) for k in student_special if student_special[k] != teacher_special[k]
    }
    checks.append(
        TokenizerCheck(
            "special tokens",
            not special_diff,
            "bos/eos/pad/unk identical" if not special_diff else f"differ (student, teacher): {special_diff}",
        )
    )

    same_template = (student.chat_template or "") == (teacher.chat_template or "")
    rendered_same = True
    if student.chat_template and teacher.chat_template:
        rendered_same = student.apply_chat_template(list(PROBE_CHAT), tokenize=False) == teacher.apply_chat_template(
            list(PROBE_CHAT), tokenize=False
        )
    checks.append(
        TokenizerCheck(
            "chat template",
            same_template and rendered_same,
            "identical"
            if same_template and rendered_same
            else "student and teacher chat templates differ: the teacher would score a prompt rendered in another "
            "format than the one the student saw",
        )
    )
    return checks


def assert_compatible_tokenizers(student_path: str, teacher_path: str) -> None:
    """Raise :class:`TokenizerMismatchError` naming every failed check and the fix."""
    _raise_failed(
        compare_tokenizers(student_path, teacher_path),
        f"Teacher tokenizer ({teacher_path}) is not compatible with the student's ({student_path}):",
        "With opd.teacher.view=student the teacher scores the student's token ids, so both must share one "
        "tokenizer and chat template. Use a teacher from the same model family, or set opd.teacher.view=own (the "
        "teacher reads the conversation in its own chat template and tokenizer), or (at your own risk) "
        "opd.check_tokenizers=False.",
    )
