"""The tiny kit: deterministic hub-free tokenizer, model and gsm8k-schema data that load offline."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.reward_score import gsm8k

from verl_opd.tiny.model import build_model, count_parameters
from verl_opd.tiny.task import build_dataset, count_problems, make_problem, make_problems, prompt_text, solution_text
from verl_opd.tiny.tokenizer import build_tokenizer, copy_tokenizer
from verl_opd.tools.cli import main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    return build_model(tmp_path_factory.mktemp("model"), AutoTokenizer.from_pretrained(tok_dir))


def test_tokenizer_build_is_byte_identical(tmp_path: Path, tok_dir: Path) -> None:
    build_tokenizer(tmp_path)
    names = sorted(p.name for p in tok_dir.iterdir())
    assert "tokenizer.json" in names
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_tokenizer_special_tokens_and_template(tok_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 512
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert no_gen == "<|im_start|>user\nhi<|im_end|>\n"


def test_digits_are_single_tokens(tok_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok("#### 1234567890", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[-10:] == list("1234567890")
    assert tok.decode(ids) == "#### 1234567890"


def test_model_dir_serves_the_same_tokenizer(tok_dir: Path, model_dir: Path) -> None:
    # transformers 5 loads a qwen2 model dir's tokenizer as Qwen2Tokenizer, rebuilding its pipeline.
    own, from_model = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(model_dir)
    assert from_model.get_vocab() == own.get_vocab()
    for text in ["What is 37 + 48? Answer with #### and the number.", "It's  3.14\n\nünï 日本 x<|im_end|>"]:
        assert from_model(text)["input_ids"] == own(text)["input_ids"]
    assert (from_model.eos_token_id, from_model.pad_token_id) == (own.eos_token_id, own.pad_token_id)
    assert from_model.chat_template == own.chat_template


def test_model_loads_offline_and_is_deterministic(tmp_path: Path, tok_dir: Path, model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert next(model.parameters()).dtype == torch.float32
    again = AutoModelForCausalLM.from_pretrained(build_model(tmp_path / "again", tok))
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    other_seed = AutoModelForCausalLM.from_pretrained(build_model(tmp_path / "seed1", tok, seed=1))
    assert not torch.equal(model.model.embed_tokens.weight, other_seed.model.embed_tokens.weight)
    bigger = AutoModelForCausalLM.from_pretrained(build_model(tmp_path / "big", tok, hidden_size=128))
    assert count_parameters(bigger) > count_parameters(model) > 50_000


def test_model_from_tokenizer_dir_copies_files_byte_for_byte(tmp_path: Path, tok_dir: Path) -> None:
    # a load/save round trip would rewrite tokenizer_config.json; teacher and student must share exact bytes
    first = build_model(tmp_path / "first", tok_dir, hidden_size=32)
    second = build_model(tmp_path / "second", first, hidden_size=48, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (second / name).read_bytes() == (first / name).read_bytes() == (tok_dir / name).read_bytes()
    with pytest.raises(FileNotFoundError):
        copy_tokenizer(tmp_path, tmp_path / "nowhere")


def test_problem_and_solution_graded_by_verl_gsm8k() -> None:
    question, answer = make_problem(random.Random(0))
    a, b = (int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" + "))
    assert a + b == answer and 10 <= a <= 99 and 10 <= b <= 99
    assert gsm8k.compute_score(solution_text(question, answer), str(answer)) == 1.0
    assert gsm8k.compute_score(solution_text(question, answer + 1), str(answer)) == 0.0
    assert gsm8k.compute_score(str(answer), str(answer)) == 0.0  # strict mode needs "####"
    three = make_problem(random.Random(0), digits=3)[0].removeprefix("What is ").removesuffix("?")
    assert all(len(x) == 3 for x in three.split(" + "))


def test_subtraction_task_is_non_negative_and_counted(tmp_path: Path) -> None:
    """The second task of the several-teachers benchmark: a >= b, every distinct pair drawable, own data_source."""
    problems = make_problems(count_problems(1, "-"), seed=0, digits=1, op="-")
    assert len(problems) == count_problems(1, "-") == 55
    for question, answer in problems:
        a, b = (int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" - "))
        assert a >= b and answer == a - b
    with pytest.raises(ValueError, match="only 55 distinct 1-digit '-' problems exist, asked for 56"):
        make_problems(56, digits=1, op="-")
    with pytest.raises(ValueError, match=r"unknown operation '\*'"):
        make_problem(random.Random(0), op="*")
    train_path, _ = build_dataset(tmp_path, n_train=8, n_test=4, op="-", data_source="lighteval/MATH")
    assert set(pd.read_parquet(train_path)["data_source"]) == {"lighteval/MATH"}


def test_dataset_schema_and_disjoint_splits(tmp_path: Path) -> None:
    train_path, test_path = build_dataset(tmp_path, n_train=64, n_test=16, seed=3)
    train, test = pd.read_parquet(train_path), pd.read_parquet(test_path)
    assert (len(train), len(test)) == (64, 16)
    assert list(train.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = train.iloc[0]
    assert row["data_source"] == "openai/gsm8k" and row["ability"] == "math"
    assert row["reward_model"]["style"] == "rule"
    assert [dict(m) for m in row["prompt"]] == [{"role": "user", "content": prompt_text(row["extra_info"]["question"])}]
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["index"] == 0
    assert row["reward_model"]["ground_truth"] == row["extra_info"]["answer"]
    questions = {split: {m[0]["content"] for m in df["prompt"]} for split, df in (("train", train), ("test", test))}
    assert len(questions["train"]) == 64 and not questions["train"] & questions["test"]
    for q, gt in zip(test["extra_info"], test["reward_model"], strict=True):
        assert gsm8k.compute_score(solution_text(q["question"], int(gt["ground_truth"])), gt["ground_truth"]) == 1.0
    again, _ = build_dataset(tmp_path / "again", n_train=64, n_test=16, seed=3)
    assert again.read_bytes() == train_path.read_bytes()
    with pytest.raises(ValueError):
        build_dataset(tmp_path / "too_many", n_train=90, n_test=20, digits=1)


def test_cli_in_process(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "tokenizer", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    args = ["tiny", "model", "--out", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"), "--hidden-size", "32"]
    assert main(args) == 0
    assert "parameters" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.hidden_size == 32
    assert (tmp_path / "m" / "tokenizer_config.json").read_bytes() == (tok_dir / "tokenizer_config.json").read_bytes()


def test_cli_subprocess(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "verl_opd.tools.cli", "tiny", "data", "--out", str(tmp_path), "--n-train", "8"]
    result = subprocess.run([*cmd, "--n-test", "4"], capture_output=True, text=True, check=True)
    assert "train.parquet" in result.stdout
    assert len(pd.read_parquet(tmp_path / "test.parquet")) == 4
