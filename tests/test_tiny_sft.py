"""CPU SFT and evaluation for the tiny arithmetic task: loss masking, learning, and batched greedy decoding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.reward_score import gsm8k

from verl_opd.tiny import demo_models
from verl_opd.tiny.evaluate import evaluate_accuracy, score_completions
from verl_opd.tiny.model import build_model
from verl_opd.tiny.sft import (
    SFTExample,
    collate,
    completion_loss,
    encode_example,
    render_prompt,
    sample_completions,
    sft_train,
)
from verl_opd.tiny.task import build_dataset, load_split, make_problem, prompt_text, solution_text
from verl_opd.tiny.tokenizer import build_tokenizer
from verl_opd.tools.demo import STUDENT_STORY


def _examples(n: int, seed: int = 0) -> list[SFTExample]:
    rng = random.Random(seed)
    problems = [make_problem(rng) for _ in range(n)]
    return [([{"role": "user", "content": prompt_text(q)}], solution_text(q, a)) for q, a in problems]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return build_model(tmp_path_factory.mktemp("init"), tok, hidden_size=32, num_layers=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, init_dir: Path) -> tuple[Path, list[SFTExample]]:
    examples = _examples(64)
    result = sft_train(init_dir, tmp_path_factory.mktemp("sft"), examples, steps=40, lr=3e-3, batch_size=16)
    assert len(result.losses) == 40 and result.seconds > 0
    return result.path, examples


def test_loss_mask_covers_only_completion(init_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(init_dir)
    messages, completion = _examples(1)[0]
    ids, mask = encode_example(tok, (messages, completion))
    assert len(ids) == len(mask)
    n_prompt = mask.index(1)
    assert set(mask[:n_prompt]) == {0} and set(mask[n_prompt:]) == {1}
    assert tok.decode(ids[:n_prompt]) == render_prompt(tok, messages)
    assert tok.decode(ids[n_prompt:]) == completion + "<|im_end|>"
    batch = collate([(ids, mask), (ids[:-2], mask[:-2])], tok.pad_token_id)
    assert batch["loss_mask"][1, -2:].tolist() == [0, 0] and batch["attention_mask"][1, -2:].tolist() == [0, 0]
    assert batch["input_ids"][1, -1].item() == tok.pad_token_id


def test_sft_reduces_completion_loss(init_dir: Path, trained: tuple[Path, list[SFTExample]]) -> None:
    path, examples = trained
    tok = AutoTokenizer.from_pretrained(path)
    batch = collate([encode_example(tok, e) for e in examples], tok.pad_token_id)
    with torch.no_grad():
        before = completion_loss(AutoModelForCausalLM.from_pretrained(init_dir), batch).item()
        after = completion_loss(AutoModelForCausalLM.from_pretrained(path), batch).item()
    assert after < 0.7 * before
    assert (path / "tokenizer.json").read_bytes() == (init_dir / "tokenizer.json").read_bytes()


def _manual_greedy(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Unbatched, unpadded argmax decoding: the reference the batched left-padded generate must match."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(render_prompt(tok, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax()
            if next_id.item() == tok.eos_token_id:
                break
            new.append(next_id.item())
    return tok.decode(new, skip_special_tokens=True)


def test_evaluate_accuracy_matches_manual_check(tmp_path: Path, trained: tuple[Path, list[SFTExample]]) -> None:
    path, _ = trained
    _, test_path = build_dataset(tmp_path, n_train=4, n_test=6, seed=1, digits=2)
    prompts, truths = load_split(test_path)
    # a 1-digit problem makes the prompts different lengths, so left padding is exercised
    prompts[0] = [{"role": "user", "content": prompt_text("What is 3 + 4?")}]
    manual = [_manual_greedy(path, m, max_new_tokens=8) for m in prompts]
    assert sample_completions(path, prompts, temperature=0.0, max_new_tokens=8, batch_size=4) == manual

    accuracy = evaluate_accuracy(path, test_path, n=3, max_new_tokens=8)
    manual_scores = [gsm8k.compute_score(c, t) for c, t in zip(manual[1:3], truths[1:3], strict=True)]
    first = _manual_greedy(path, load_split(test_path, 1)[0][0], max_new_tokens=8)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx((gsm8k.compute_score(first, truths[0]) + sum(manual_scores)) / 3)
    assert score_completions(["#### 12", "#### 13", "12"], ["12", "12", "12"]) == [1.0, 0.0, 0.0]

    sampled = sample_completions(path, prompts[:2], temperature=1.0, max_new_tokens=8)
    assert len(sampled) == 2 and all(isinstance(s, str) for s in sampled)


def test_build_demo_models_shares_tokenizer_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "steps": 3, "lr": 1e-3}
    habit = {**demo_models.DEMO_SETTINGS["students"]["habit"], "steps": 3}
    settings = {**demo_models.DEMO_SETTINGS, "digits": 1, "n_train": 20, "n_test": 10}
    settings.update(
        teacher=tiny,
        students={"habit": habit, "small": {**tiny, "warmup_steps": 1}},
        other_teacher={**demo_models.DEMO_SETTINGS["other_teacher"], "steps": 3},
        teacher_min_accuracy=0.0,
    )
    monkeypatch.setattr(demo_models, "DEMO_SETTINGS", settings)
    built = demo_models.build_demo_models(tmp_path)
    assert not built["cached"] and set(built["seconds"]) == {"teacher", "student"}
    assert 0.0 <= built["student_accuracy"] <= 1.0 and built["student_kind"] == "habit"
    for role in ("teacher", "student"):
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (Path(built[role]) / name).read_bytes() == (Path(built["tokenizer"]) / name).read_bytes()
    # the habit student starts from the teacher's weights (same architecture), the small one from scratch
    teacher_config = json.loads((Path(built["teacher"]) / "config.json").read_text())
    assert (
        json.loads((Path(built["student"]) / "config.json").read_text())["hidden_size"] == teacher_config["hidden_size"]
    )

    small = demo_models.build_demo_models(tmp_path, student="small")  # the teacher is reused
    assert set(small["seconds"]) == {"student"} and small["teacher"] == built["teacher"]
    other = demo_models.build_demo_models(tmp_path, other_teacher=True)  # only the other teacher is built
    assert set(other["seconds"]) == {"other_teacher"} and 0.0 <= other["other_teacher_accuracy"] <= 1.0
    for name in ("tokenizer.json", "chat_template.jinja"):  # its own tokenizer, a Llama so it loads as saved
        assert (Path(other["other_teacher"]) / name).read_bytes() == (
            Path(other["other_tokenizer"]) / name
        ).read_bytes()
        assert (Path(other["other_teacher"]) / name).read_bytes() != (Path(built["tokenizer"]) / name).read_bytes()
    assert json.loads((Path(other["other_teacher"]) / "config.json").read_text())["model_type"] == "llama"

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached models must not be retrained")

    monkeypatch.setattr(demo_models, "sft_train", no_training)
    again = demo_models.build_demo_models(tmp_path, other_teacher=True)
    assert again["cached"] and again["teacher"] == built["teacher"]
    assert again["other_teacher_accuracy"] == other["other_teacher_accuracy"]
    assert again["student_accuracy"] == built["student_accuracy"]
    with pytest.raises(AssertionError, match="retrained"):
        demo_models.build_demo_models(tmp_path, seed=1)  # other settings: rebuild
    with pytest.raises(ValueError, match="habit, small"):
        demo_models.build_demo_models(tmp_path, student="tiny")
    assert set(STUDENT_STORY) == set(demo_models.STUDENTS)  # the CLI's choices are the kinds it can build


def test_habit_examples_shift_a_seeded_fraction_of_answers(tmp_path: Path) -> None:
    _, test = build_dataset(tmp_path, n_train=20, n_test=10, seed=0, digits=1)
    clean = demo_models.sft_examples(test, digits=1, seed=0)
    shifted = demo_models.sft_examples(test, digits=1, seed=0, shift={"wrong_fraction": 0.5, "offset": 1})
    assert [prompt for prompt, _ in clean] == [prompt for prompt, _ in shifted]
    answers = [
        (int(a.split("####")[-1]), int(b.split("####")[-1])) for (_, a), (_, b) in zip(clean, shifted, strict=True)
    ]
    wrong = [b - a for a, b in answers if a != b]
    assert set(wrong) == {1}
    assert 0.3 < len(wrong) / len(answers) < 0.7
