"""The teacher's prompt and response ids in its own chat template and tokenizer (``opd.teacher.view=own``).

The teacher reads the conversation the student was given (verl's ``raw_prompt`` messages) as its own
family renders it, and the student's response as text, the way it would read its own generation:

- prompt: rendered with the teacher's chat template by verl's own renderer, the one verl's agent loop
  renders the student's prompt with (``create_continuous_token_builder(...).build_initial_tokens``,
  verl/experimental/agent_loop/agent_loop.py:248, verl/utils/tokenizer/continuous_token.py), with
  ``add_generation_prompt=True``. The template's default system prompt (Llama-3's, ...) is kept;
  ``opd.teacher.system_prompt`` replaces the conversation's system message, or adds one, for the teacher
  only (so include a dataset system message's text in it if the teacher should still read that).
- context (``opd.teacher.context_key``, e.g. ``extra_info.solution``): that dataset field's text is
  appended to the last user message, after a blank line, under the header :data:`CONTEXT_HEADER`. The
  user turn is the one place every chat template renders (some refuse system messages), and the
  teacher reads the hint as part of the question it answers.
- response: the student's response bytes encoded by the teacher's tokenizer (:class:`ByteEncoder`, no
  special tokens, a special token's string read as text), then the teacher's end-of-turn ids if the
  student ended with its EOS. Prompt and response are encoded separately and concatenated, as when the
  teacher itself generates after its generation prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from verl_opd.teacher_view.byte_tables import ByteEncoder, added_token_ids, check_byte_level

CONTEXT_HEADER = "Reference:"
# Content of the assistant message rendered to find where the teacher's template ends a turn.
_PROBE = "PROBE"
_PROBE_CHAT = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE})


def dataset_field(fields: Mapping[str, Any], key: str) -> str:
    """The text of the dotted dataset field ``key`` (``extra_info.solution``) in one sample's ``fields``."""
    value: Any = fields
    for depth, part in enumerate(key.split(".")):
        if not isinstance(value, Mapping) or part not in value:
            where = ".".join(key.split(".")[:depth]) or "the sample"
            have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise KeyError(
                f"opd.teacher.context_key={key!r}: {where} has no field {part!r} (it has {have}); set "
                "opd.teacher.context_key to a dataset field every row has"
            )
        value = value[part]
    if value is None:
        raise ValueError(f"opd.teacher.context_key={key!r} is null in this sample; every row needs that text")
    return str(value)


def teacher_messages(
    raw_prompt: Sequence[Mapping[str, Any]], *, system_prompt: str | None = None, context: str | None = None
) -> list[dict[str, str]]:
    """The messages the teacher reads: ``raw_prompt`` plus its own system prompt and context (see module doc)."""
    messages = []
    for message in raw_prompt:
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"opd.teacher.view=own renders text conversations only; a {message.get('role')!r} message has "
                f"content of type {type(message.get('content')).__name__} (multimodal or structured content)"
            )
        messages.append({"role": str(message["role"]), "content": message["content"]})
    if system_prompt is not None:
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": system_prompt}
        else:
            messages.insert(0, {"role": "system", "content": system_prompt})
    if context is not None:
        users = [i for i, message in enumerate(messages) if message["role"] == "user"]
        if not users:
            raise ValueError("opd.teacher.context_key needs a user message to append the context to; there is none")
        last = messages[users[-1]]
        messages[users[-1]] = {"role": "user", "content": f"{last['content']}\n\n{CONTEXT_HEADER}\n{context}"}
    return messages


def teacher_end_of_turn(tokenizer: Any, chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """The ids the teacher's template ends an assistant turn with, up to and including its first added token.

    Renders [user, assistant "PROBE"] and encodes what follows "PROBE" (``<|eot_id|>`` for Llama-3,
    ``<|im_end|>`` for ChatML; text after that token, such as ChatML's newline, is not part of the turn).
    """
    text = tokenizer.apply_chat_template(list(_PROBE_CHAT), tokenize=False, **(chat_template_kwargs or {}))
    position = text.rfind(_PROBE)
    if position < 0:
        raise ValueError(
            f"the teacher's chat template ({tokenizer.name_or_path}) does not render an assistant message's content "
            f"as given: {text!r}; its end of turn cannot be found"
        )
    suffix = text[position + len(_PROBE) :]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    added = added_token_ids(tokenizer)
    for index, token in enumerate(ids):
        if token in added:
            return ids[: index + 1]
    raise ValueError(
        f"the teacher's chat template ({tokenizer.name_or_path}) ends an assistant turn with {suffix!r}, which holds "
        "no special token: where the teacher's turn ends cannot be scored. Give the teacher a chat template that "
        "closes assistant turns with its end-of-turn token."
    )


def config_json_value(model_path: str, key: str) -> Any:
    """``key`` of ``model_path``'s ``config.json``, or None when there is no such file or key."""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        return json.load(f).get(key)


def model_type(model_path: str) -> str | None:
    """``model_type`` of ``model_path``'s ``config.json`` (what verl picks its prompt renderer by), if any."""
    return config_json_value(model_path, "model_type")


@dataclass
class TeacherView:
    """Everything the teacher needs to read one sample in its own format; built once per worker.

    ``chat_template_kwargs`` are verl's ``data.apply_chat_template_kwargs`` (what the student's prompt
    was rendered with); ``hf_model_type`` selects verl's renderer, as for the student.
    """

    tokenizer: Any
    system_prompt: str | None = None
    context_key: str | None = None
    hf_model_type: str | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

        check_byte_level(self.tokenizer, "teacher")
        self.encoder = ByteEncoder(self.tokenizer, special_tokens_as_text=True)
        self.end_of_turn = teacher_end_of_turn(self.tokenizer, self.chat_template_kwargs)
        self._builder = create_continuous_token_builder(
            self.tokenizer, hf_model_type=self.hf_model_type, chat_template_kwargs=dict(self.chat_template_kwargs or {})
        )

    @classmethod
    def load(cls, model_path: str, **kwargs: Any) -> TeacherView:
        """The view of the teacher saved at ``model_path`` (its tokenizer and ``config.json`` model type)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_path), hf_model_type=model_type(model_path), **kwargs)

    def messages(
        self, raw_prompt: Sequence[Mapping[str, Any]], fields: Mapping[str, Any] | None = None
    ) -> list[dict[str, str]]:
        """The teacher's messages for one sample; ``fields`` are its dataset fields (for ``context_key``)."""
        context = None
        if self.context_key is not None:
            context = dataset_field(fields or {}, self.context_key)
        return teacher_messages(raw_prompt, system_prompt=self.system_prompt, context=context)

    def prompt_ids(self, raw_prompt: Sequence[Mapping[str, Any]], fields: Mapping[str, Any] | None = None) -> list[int]:
        """The teacher's prompt ids for one sample, ending with its generation prompt."""
        return list(self._builder.build_initial_tokens(self.messages(raw_prompt, fields)))

    def response_ids(self, response_bytes: Sequence[bytes], ended: Sequence[bool]) -> list[list[int]]:
        """Per sample: the teacher's ids of the student's response bytes, plus its end of turn where ``ended``."""
        encoded = self.encoder.encode_batch(response_bytes)
        return [ids + self.end_of_turn if end else ids for ids, end in zip(encoded, ended, strict=True)]
