"""The teacher worker's own-view mapping (``verl_opd.glue.own_view``) in process, against a real HF forward.

verl's engine is replaced here by the same computation on an HF model (per-token log-probs of the
next token, shifted left by one as verl's model output is), so the student's and the teacher's
geometry can be compared token by token without Ray. The e2e tests run verl's own engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import verl  # noqa: F401  (loads the plugin: registers the opd estimator)
from omegaconf import OmegaConf
from tensordict import TensorDict
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.protocol import DataProto

from verl_opd.config.opd_config import OPDConfig
from verl_opd.core.xtok import INVALID_UTF8, KEPT, PROMPT_CUT, TRUNCATED, chunk_metrics, token_chunk_metrics
from verl_opd.glue.own_view import XTOK_FIELDS, OwnViewScorer
from verl_opd.glue.trainer import _kept_chunk_ids, opd_advantage_step
from verl_opd.teacher_view.render import TeacherView
from verl_opd.tiny.task import make_problems, prompt_text, solution_text


def _shifted_log_probs(model: torch.nn.Module, rows: list[torch.Tensor]) -> torch.Tensor:
    """What verl's engine returns as ``log_probs``: log p(token p+1 | <= p) at position p, jagged."""
    out = []
    with torch.no_grad():
        for ids in rows:
            logits = model(ids.unsqueeze(0)).logits[0].float()
            lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:].unsqueeze(1)).squeeze(1)
            out.append(torch.cat([lp, torch.zeros(1)]))
    return torch.nested.as_nested_tensor(out, layout=torch.jagged)


@pytest.fixture(scope="module")
def setup(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny.student)
    model = AutoModelForCausalLM.from_pretrained(tiny.teacher).eval()
    student_view = TeacherView(tokenizer)
    scorer = OwnViewScorer(tokenizer, student_view, TeacherView(tokenizer), [tokenizer.eos_token_id], 8192)
    return tokenizer, model, student_view, scorer


def _batch(tokenizer, student_view, responses: list[list[int]], cut_prompt: bool = False) -> TensorDict:
    """A verl-like student batch: the student's rendered prompts, the given responses, raw messages."""
    raw = [[{"role": "user", "content": prompt_text(q)}] for q, _ in make_problems(len(responses), seed=3)]
    prompts = [torch.tensor(student_view.prompt_ids(messages)) for messages in raw]
    if cut_prompt:
        prompts[0] = prompts[0][4:]  # what the rollout's prompt_length does to a long prompt
    resp = [torch.tensor(r) for r in responses]
    jag = lambda rows: torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    data = TensorDict(
        {
            "prompts": jag(prompts),
            "responses": jag(resp),
            "response_mask": jag([torch.ones(len(r), dtype=torch.long) for r in resp]),
            "input_ids": jag([torch.cat([p, r]) for p, r in zip(prompts, resp, strict=True)]),
        },
        batch_size=[len(resp)],
    )
    data.set_non_tensor("raw_prompt", raw)  # NonTensorStack-like: one message list per sample
    data.set_non_tensor("temperature", 1.0)
    return data


def _answers(tokenizer) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [tokenizer.encode(solution_text(q, a)) + [eos] for q, a in make_problems(3, seed=3)]


def test_same_tokenizer_own_view_scores_exactly_the_students_tokens(setup):
    """Same tokenizer and template: the teacher's batch is the student's, every chunk one token, log-probs equal."""
    tokenizer, model, student_view, scorer = setup
    responses = _answers(tokenizer)
    responses[2] = responses[2][:-1]  # cut by the length limit: no EOS, last chunk masked
    data = _batch(tokenizer, student_view, responses)
    teacher_batch, alignments, flags = scorer.to_teacher(data)
    for a, b in zip(teacher_batch["input_ids"].unbind(), data["input_ids"].unbind(), strict=True):
        assert torch.equal(a, b)
    output = TensorDict({"log_probs": _shifted_log_probs(model, list(teacher_batch["input_ids"].unbind()))}, [3])
    fields = scorer.to_student(output, teacher_batch, data, alignments, flags)
    student_geometry = _shifted_log_probs(model, list(data["input_ids"].unbind()))
    for i, response in enumerate(responses):
        n = len(response)
        expected = student_geometry[i][-n - 1 : -1]
        assert torch.equal(fields["log_probs"][i][-n - 1 : -1], expected)
        assert torch.equal(fields["xtok_teacher_lp"][i], expected)  # one-token chunks: T_c is the token's
        assert torch.equal(fields["xtok_chunk"][i], torch.arange(n))
        assert fields["xtok_teacher_n"][i].tolist() == [1] * n
    reasons = [fields["xtok_reason"][i].tolist() for i in range(3)]
    assert reasons[0] == [KEPT] * len(responses[0])
    assert reasons[2][:-1] == [KEPT] * (len(responses[2]) - 1) and reasons[2][-1] == TRUNCATED


def test_advantage_step_own_view_equals_student_view_with_same_tokenizer(setup):
    """The trainer's advantage step on the own-view fields gives the student-view advantage bit for bit."""
    tokenizer, model, student_view, scorer = setup
    responses = _answers(tokenizer)
    data = _batch(tokenizer, student_view, responses)
    teacher_batch, alignments, flags = scorer.to_teacher(data)
    output = TensorDict({"log_probs": _shifted_log_probs(model, list(teacher_batch["input_ids"].unbind()))}, [3])
    fields = scorer.to_student(output, teacher_batch, data, alignments, flags)
    width = max(len(r) for r in responses)

    def pad(rows, dtype):
        out = torch.zeros(len(rows), width, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
        return out

    mask = pad([[1] * len(r) for r in responses], torch.long)
    teacher_lp = pad([fields["xtok_teacher_lp"][i] for i in range(3)], torch.float32)
    student_lp = teacher_lp - 0.3 * mask - 0.01 * torch.arange(width) * mask  # any student log-probs
    base = {
        "responses": pad(responses, torch.long),
        "response_mask": mask,
        "rm_scores": pad([[0.0] * (len(r) - 1) + [float(i)] for i, r in enumerate(responses)], torch.float32),
        "old_log_probs": student_lp,
        "ref_log_prob": teacher_lp,
    }
    own = {**base, **{name: pad([fields[name][i] for i in range(3)], torch.float32) for name in XTOK_FIELDS}}
    for name in ("xtok_chunk", "xtok_reason", "xtok_teacher_n", "xtok_noncanonical"):
        own[name] = own[name].long()
    uids = np.array(["a", "a", "b"], dtype=object)
    algorithm = OmegaConf.create({"adv_estimator": "opd", "gamma": 1.0})
    for discount in (0.0, 0.5, 1.0):
        opd = OPDConfig(kl_coef=0.7, discount=discount, task_reward_coef=0.3)
        want, _ = opd_advantage_step(DataProto.from_dict(tensors=base), uids, opd, algorithm, [tokenizer.eos_token_id])
        got, metrics = opd_advantage_step(DataProto.from_dict(tensors=own), uids, opd, algorithm, [])
        assert torch.equal(got["advantages"], want["advantages"]), discount
        assert metrics["opd/xtok/one_to_one_chunk_frac"] == 1.0 and metrics["opd/xtok/masked_token_frac"] == 0.0


def test_a_prompt_the_rollout_cut_masks_the_sample_and_invalid_bytes_their_chunk(setup):
    tokenizer, model, student_view, scorer = setup
    responses = _answers(tokenizer)
    high_byte = next(i for i, piece in enumerate(scorer.student_table) if piece == b"\xc3")  # a lone lead byte
    responses[1] = responses[1][:2] + [high_byte] + responses[1][2:]
    data = _batch(tokenizer, student_view, responses, cut_prompt=True)
    _, alignments, _ = scorer.to_teacher(data)
    assert set(alignments[0].mask_reason.tolist()) == {PROMPT_CUT}
    assert INVALID_UTF8 in alignments[1].mask_reason.tolist() and KEPT in alignments[1].mask_reason.tolist()
    assert set(alignments[2].mask_reason.tolist()) == {KEPT}


def test_token_chunk_metrics_equal_chunk_metrics(setup):
    """The trainer's metrics from the written-back fields equal the worker's from its alignments."""
    tokenizer, model, student_view, scorer = setup
    responses = _answers(tokenizer)
    responses[1] = responses[1][:-1]
    data = _batch(tokenizer, student_view, responses, cut_prompt=True)
    teacher_batch, alignments, flags = scorer.to_teacher(data)
    output = TensorDict({"log_probs": _shifted_log_probs(model, list(teacher_batch["input_ids"].unbind()))}, [3])
    fields = scorer.to_student(output, teacher_batch, data, alignments, flags)
    padded = {name: torch.nested.to_padded_tensor(fields[name], 0) for name in XTOK_FIELDS}
    mask = torch.nested.to_padded_tensor(data["response_mask"], 0)
    got = token_chunk_metrics(
        padded["xtok_chunk"], padded["xtok_reason"], padded["xtok_teacher_n"], padded["xtok_noncanonical"], mask
    )
    assert got == chunk_metrics(alignments)
    assert got["opd/xtok/masked_token_frac/prompt_cut"] > 0 and got["opd/xtok/masked_token_frac/truncated"] > 0


def test_a_chunk_touched_by_rollout_rejection_loses_all_its_tokens():
    chunk = torch.tensor([[0, 1, 1, 2, 3], [0, 0, 1, 2, 0]])
    reason = torch.zeros_like(chunk)
    sampled = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])  # rejection took token 2 of row 0 (chunk 1)
    reason[1, 3] = 2  # a masked chunk (truncated)
    assert _kept_chunk_ids(chunk, reason, sampled, mask).tolist() == [[0, -1, -1, 2, 3], [0, 0, 1, -1, -1]]
