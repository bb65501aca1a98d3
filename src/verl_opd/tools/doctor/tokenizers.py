"""``tokenizers``: student and teacher map text to the same ids (before any model loads).

With ``opd.teacher.view=own`` in the overrides: what aligning two different tokenizers on bytes needs.
"""

from __future__ import annotations

import os

from verl_opd.config.opd_config import VIEW_OWN, VIEW_STUDENT
from verl_opd.tools.doctor.report import FAIL, PASS, Check

_OWN_VIEW = "or set opd.teacher.view=own to let the teacher read the conversation in its own tokenizer"
_NOT_BYTE_LEVEL = (
    "opd.teacher.view=own needs byte-level BPE tokenizers (Qwen, Llama-3, DeepSeek-V3); use a teacher that "
    "shares the student's tokenizer, with opd.teacher.view=student"
)

# Fix to print under a failed tokenizer check (the check's own detail says what differs).
_TOKENIZER_FIXES = {
    "vocabulary ids": "the teacher would score other tokens than the student sampled; use a teacher of the "
    f"student's model family whose tokenizer files are identical, {_OWN_VIEW}",
    "teacher embedding covers student ids": "the teacher needs an embedding row for every id the student can emit; "
    "use a teacher whose vocab_size is at least the student's",
    "probe texts encode to the same ids": f"the two tokenizers split text differently; use one tokenizer for both, "
    f"{_OWN_VIEW}",
    "special tokens": "make bos/eos/pad/unk identical, e.g. save the student with the teacher's tokenizer files "
    "(tokenizer.json, tokenizer_config.json, chat_template.jinja)",
    "chat template": "the teacher would score prompts rendered in the student's format, not its own; give both the "
    f"same chat template (chat_template.jinja / tokenizer_config.json), {_OWN_VIEW}, or set opd.check_tokenizers=False "
    "on purpose",
    # opd.teacher.view=own
    "student tokenizer is byte-level BPE": _NOT_BYTE_LEVEL,
    "teacher tokenizer is byte-level BPE": _NOT_BYTE_LEVEL,
    "student byte table round trip": _NOT_BYTE_LEVEL,
    "teacher byte table round trip": _NOT_BYTE_LEVEL,
    "student eos token": "give the student tokenizer an eos token (tokenizer_config.json eos_token)",
    "teacher chat template": "give the teacher a chat template whose assistant turns end with a special token",
}


def _model_dir_problem(path: str | None, role: str, flag: str) -> str | None:
    """Why ``path`` cannot be a model directory, or None."""
    if not path:
        return f"no {role} given: pass {flag} PATH"
    if not os.path.exists(path):
        return (
            f"{role} path {path!r} does not exist; it must be a local directory saved with save_pretrained "
            f"(download a hub model first, e.g. `hf download <org/name> --local-dir DIR`)"
        )
    if not os.path.isdir(path):
        return f"{role} path {path!r} is a file, not a model directory"
    return None


def check_tokenizers(student: str | None, teacher: str | None, view: str = VIEW_STUDENT) -> list[Check]:
    """One line per :class:`~verl_opd.checks.tokenizer_check.TokenizerCheck` for ``view`` (``opd.teacher.view``);
    unreadable paths are a FAIL."""
    problems = [
        Check("tokenizers", role, FAIL, problem)
        for role, problem in (
            ("student", _model_dir_problem(student, "student", "--student")),
            ("teacher", _model_dir_problem(teacher, "teacher", "--teacher")),
        )
        if problem
    ]
    if problems:
        return problems
    from verl_opd.checks.tokenizer_check import compare_tokenizers, own_view_checks

    try:
        results = (own_view_checks if view == VIEW_OWN else compare_tokenizers)(student, teacher)
    except Exception as exc:  # noqa: BLE001 - any loader error is the user's to see
        return [
            Check(
                "tokenizers",
                "load",
                FAIL,
                f"could not load both tokenizers ({type(exc).__name__}: {exc}); both directories need "
                "tokenizer files saved with save_pretrained",
            )
        ]
    checks = []
    for result in results:
        detail = result.detail
        if not result.passed and result.name in _TOKENIZER_FIXES:
            detail += f"\nfix: {_TOKENIZER_FIXES[result.name]}"
        checks.append(Check("tokenizers", result.name, PASS if result.passed else FAIL, detail))
    return checks
