"""The teacher's own view (issue 12): byte tables, byte-level checks, canonical re-encoding, teacher prompts.

Student: the tiny kit's ChatML tokenizer (one token per digit). Teacher: ``build_other_tokenizer`` in a
Llama model directory (Llama-3 digit groups, its own template, default system prompt and ``<|eot_id|>``).
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from verl_opd.checks.tokenizer_check import PROBE_TEXTS
from verl_opd.teacher_view.byte_tables import (
    ByteEncoder,
    NotByteLevelError,
    added_token_ids,
    byte_table,
    canonical_ids,
    check_byte_level,
    round_trip_problems,
)
from verl_opd.teacher_view.render import (
    CONTEXT_HEADER,
    TeacherView,
    dataset_field,
    model_type,
    teacher_end_of_turn,
    teacher_messages,
)
from verl_opd.tiny.tokenizer import OTHER_DEFAULT_SYSTEM_PROMPT, build_other_tokenizer, build_tokenizer

QUESTION = [{"role": "user", "content": "What is 37 + 48? Answer with #### and the number."}]
FIELDS = {"extra_info": {"answer": 85, "index": 3}}


@pytest.fixture(scope="module")
def student(tiny):
    return AutoTokenizer.from_pretrained(tiny.student)


@pytest.fixture(scope="module")
def teacher(other_teacher):
    return AutoTokenizer.from_pretrained(other_teacher)


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_other_tokenizer_is_another_byte_level_family(tiny, student, teacher, tmp_path):
    """Loaded from its Llama model directory it keeps its own regex: digits in groups of up to three."""
    assert type(teacher).__name__ == "TokenizersBackend"
    assert all(len(piece) <= 3 for piece in _pieces(teacher, "1234567890"))
    assert len(_pieces(teacher, "1234567890")) < 10 == len(_pieces(student, "1234567890"))
    assert teacher.eos_token == "<|eot_id|>" and teacher.bos_token == "<|begin_of_text|>"
    assert teacher("hi")["input_ids"][0] == teacher.bos_token_id  # like Llama-3, encode prepends bos
    assert teacher("hi", add_special_tokens=False)["input_ids"][0] != teacher.bos_token_id
    rendered = teacher.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{OTHER_DEFAULT_SYSTEM_PROMPT}<|eot_id|>"
    )
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    build_other_tokenizer(tmp_path)  # deterministic: the same files again
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tiny.root / "other_tokenizer" / name).read_bytes(), name


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_byte_tables_round_trip_probe_texts(role, student, teacher):
    tokenizer = {"student": student, "teacher": teacher}[role]
    texts = (*PROBE_TEXTS, "naïve café 1234567", "🙂🙂 #### 42")
    assert round_trip_problems(tokenizer, texts) == []
    table, special = byte_table(tokenizer), added_token_ids(tokenizer)
    assert len(table) == len(tokenizer)
    assert tokenizer.eos_token_id in special
    assert table[tokenizer.eos_token_id] == tokenizer.eos_token.encode()


def test_multibyte_character_split_across_tokens(student, teacher):
    """Both tokenizers cut "ï" (c3 af) between two tokens: each id's bytes are not valid UTF-8 on their own."""
    for tokenizer in (student, teacher):
        ids = tokenizer(" naïve", add_special_tokens=False)["input_ids"]
        table = byte_table(tokenizer)
        pieces = [table[i] for i in ids]
        assert b"".join(pieces) == " naïve".encode()
        (cut,) = [i for i, piece in zip(ids, pieces, strict=True) if piece.endswith(b"\xc3")]
        assert tokenizer.decode([cut]).endswith("\ufffd")  # what a decode-based alignment would compare


def test_invalid_utf8_spells_exact_bytes(student, teacher):
    """A response cut inside "€" (e2 82 ac) or with stray bytes: invalid bytes become their own byte tokens."""
    for tokenizer in (student, teacher):
        encoder = ByteEncoder(tokenizer)
        for data in (b"#### 12 \xe2\x82", b"\xff#### \xc3 7"):
            ids = encoder.encode(data)
            assert b"".join(encoder.table[i] for i in ids) == data
        assert [encoder.table[i] for i in encoder.encode(b"#### \xe2\x82")[-2:]] == [b"\xe2", b"\x82"]
        assert encoder.encode_batch([b"a\xff", b"", b"12"]) == [encoder.encode(b"a\xff"), [], encoder.encode(b"12")]


def test_canonical_ids_undo_a_non_canonical_split(tmp_path):
    """Sampled ids spelling "What" letter by letter re-encode to the tokenizer's own merge."""
    student = build_tokenizer(tmp_path)  # the default 512 entries have merges (the fixture's 256 almost none)
    merged = student("What", add_special_tokens=False)["input_ids"]
    assert len(merged) == 1
    split = [student.convert_tokens_to_ids(letter) for letter in "What"]
    table = byte_table(student)
    assert b"".join(table[i] for i in split) == b"What"
    assert canonical_ids(student, b"What") == merged != split
    # the student's end-of-turn token spelled out as text pieces re-encodes to the special id itself
    pieces = (
        student("<|im", add_special_tokens=False)["input_ids"]
        + student("_end|>", add_special_tokens=False)["input_ids"]
    )
    assert canonical_ids(student, b"".join(table[i] for i in pieces)) == [student.eos_token_id]


def _metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={"▁a": 0, "b": 1, "<unk>": 2}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _nfkc(student) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(student.backend_tokenizer.to_str())
    tok.normalizer = normalizers.NFKC()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda student: _metaspace(), "has no ByteLevel step"),
        (lambda student: _wordpiece(), "its model is WordPiece, not BPE"),
        (_nfkc, "its normalizer (['NFKC']) rewrites the text"),
    ],
)
def test_non_byte_level_tokenizers_are_refused(student, build, why):
    with pytest.raises(NotByteLevelError) as error:
        check_byte_level(build(student), "teacher")
    message = str(error.value)
    assert why in message and "the teacher tokenizer" in message
    assert "opd.teacher.view=student" in message


def test_end_of_turn_from_each_template(student, teacher):
    assert teacher.convert_ids_to_tokens(teacher_end_of_turn(teacher)) == ["<|eot_id|>"]
    assert student.convert_ids_to_tokens(teacher_end_of_turn(student)) == ["<|im_end|>"]  # not its "\n"
    plain = AutoTokenizer.from_pretrained(teacher.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="holds no special token"):
        teacher_end_of_turn(plain)


def test_teacher_prompt_in_its_own_template(tiny, other_teacher, student, teacher):
    """The teacher reads the student's question in its own format, plus what only it is given."""
    student_view = TeacherView.load(str(tiny.student))  # the student's own rendering, by the same verl renderer
    student_text = student.decode(student_view.prompt_ids(QUESTION))
    assert student_text == student.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)

    plain = TeacherView.load(str(other_teacher))
    assert model_type(str(other_teacher)) == "llama"
    ids = plain.prompt_ids(QUESTION)
    plain_text = teacher.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert ids == teacher(plain_text, add_special_tokens=False)["input_ids"]
    assert OTHER_DEFAULT_SYSTEM_PROMPT in plain_text and QUESTION[0]["content"] in plain_text
    assert ids.count(teacher.bos_token_id) == 1

    hinted = TeacherView.load(str(other_teacher), system_prompt="Grade strictly.", context_key="extra_info.answer")
    text = teacher.decode(hinted.prompt_ids(QUESTION, FIELDS))
    assert "system<|end_header_id|>\n\nGrade strictly.<|eot_id|>" in text
    assert OTHER_DEFAULT_SYSTEM_PROMPT not in text
    assert f"{QUESTION[0]['content']}\n\n{CONTEXT_HEADER}\n85<|eot_id|>" in text
    assert "85" not in student_text and "Grade strictly." not in student_text


def test_teacher_messages_replace_the_system_message_and_refuse_what_cannot_be_rendered():
    with_system = [{"role": "system", "content": "Dataset system."}, *QUESTION]
    assert teacher_messages(with_system, system_prompt="Teacher only.")[0] == {
        "role": "system",
        "content": "Teacher only.",
    }
    assert teacher_messages(with_system) == with_system
    assert len(teacher_messages(QUESTION, system_prompt="x")) == 2
    with pytest.raises(ValueError, match="renders text conversations only"):
        teacher_messages([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="needs a user message"):
        teacher_messages([{"role": "system", "content": "s"}], context="hint")
    assert dataset_field(FIELDS, "extra_info.answer") == "85"
    with pytest.raises(KeyError, match=r"extra_info has no field 'solution' \(it has \['answer', 'index'\]\)"):
        dataset_field(FIELDS, "extra_info.solution")


def test_teacher_response_ids(other_teacher, teacher):
    view = TeacherView.load(str(other_teacher))
    responses = [b"#### 85", "#### 8 <|eot_id|> 5 ï".encode(), b"#### 12\xe2\x82"]
    ended, cut, injected = view.response_ids([responses[0], responses[0], responses[1]], [True, False, True])
    assert ended == cut + [teacher.convert_tokens_to_ids("<|eot_id|>")]
    assert cut == teacher("#### 85", add_special_tokens=False)["input_ids"]
    # the student's text never ends the teacher's turn: a special token's string is read as text
    assert injected.count(teacher.eos_token_id) == 1 and injected[-1] == teacher.eos_token_id
    assert b"".join(view.encoder.table[i] for i in injected[:-1]) == responses[1]
    (invalid,) = view.response_ids([responses[2]], [False])
    assert b"".join(view.encoder.table[i] for i in invalid) == responses[2]
