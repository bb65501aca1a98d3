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


def _brute_extension_log_mass(log_probs: torch.Tensor, token: int, table: list[bytes], special: set[int]) -> float:
    """log sum of p(v) over the ids whose bytes start with ``token``'s (a special id extends only itself)."""
    if token in special:
        return float(log_probs[token])
    prefix = table[token]
    ids = [v for v, piece in enumerate(table) if v not in special and piece.startswith(prefix)]
    return float(torch.logsumexp(log_probs[ids].double(), dim=0))


def _verl_like_output(model, rows: list[torch.Tensor], hook) -> TensorDict:
    """verl's engine output with the shaping hook: ``log_probs`` and the hook's field, both shifted left by one.

    The logits of the whole batch are packed and handed to the hook as verl's engine does
    (``student_logits=(1, N, V)``, ``data`` with the jagged ``input_ids``).
    """
    from verl_opd.glue.shaping import EXTENSION_FIELD

    with torch.no_grad():
        logits = torch.cat([model(ids.unsqueeze(0)).logits[0].float() for ids in rows])
    data = TensorDict({"input_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, [len(rows)])
    packed = hook(student_logits=logits.unsqueeze(0), data=data)[EXTENSION_FIELD].squeeze(0)
    masses = torch.nested.nested_tensor_from_jagged(packed, data["input_ids"].offsets())
    return TensorDict({"log_probs": _shifted_log_probs(model, rows), EXTENSION_FIELD: masses}, [len(rows)])


def test_extension_hook_labels_packed_sequences_like_verl():
    """The hook's value at position p is the extension mass of token p + 1 under the logits at p, sequence by
    sequence through verl's packing, with a vocabulary padded beyond the tokenizer's ids."""
    from verl_opd.glue.shaping import EXTENSION_FIELD, ExtensionMassHook

    table = [b"a", b"ab", b"abc", b"b", b"", b"ba"]  # id 4: zero bytes, an EOS-like special
    hook = ExtensionMassHook(table, special_ids=[4])
    rows = [torch.tensor([0, 1, 3, 4]), torch.tensor([3, 5, 0])]
    logits = torch.randn(7, 8, generator=torch.Generator().manual_seed(0))  # 2 padded vocabulary entries
    data = TensorDict({"input_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, [2])
    out = hook(student_logits=logits.unsqueeze(0), data=data)[EXTENSION_FIELD]
    assert out.shape == (1, 7)
    padded_table = table + [b"", b""]
    special = {4, 6, 7}
    position = 0
    for ids in rows:
        for p in range(len(ids) - 1):
            log_probs = torch.log_softmax(logits[position + p], dim=-1)
            want = _brute_extension_log_mass(log_probs, int(ids[p + 1]), padded_table, special)
            assert abs(float(out[0, position + p]) - want) < 1e-6, (position, p)
        position += len(ids)
    assert hook(model_output={"x": out}, data=data)[0].item() == 0.0  # verl's loss call after the hook: no loss
    with pytest.raises(ValueError, match="not this model's"):
        hook(student_logits=logits[:, :5].unsqueeze(0), data=data)


@pytest.fixture(scope="module")
def other_view(tiny, other_teacher):
    """A student scored by a teacher of another tokenizer and chat template, with both potentials."""
    from verl_opd.teacher_view.byte_tables import added_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(other_teacher)
    student_view = TeacherView(tokenizer)
    scorer = OwnViewScorer(
        tokenizer, student_view, TeacherView(teacher_tokenizer), [tokenizer.eos_token_id], 8192, shaping="both"
    )
    student = AutoModelForCausalLM.from_pretrained(tiny.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(other_teacher).eval()
    specials = (set(added_token_ids(tokenizer)), set(added_token_ids(teacher_tokenizer)))
    return tokenizer, student_view, scorer, student, teacher, specials


def _potentials(model, rows, table, special, chunk_of, alignment, response_len, ended) -> np.ndarray:
    """Φ at each chunk's last response token, brute force (0 for an EOS chunk and a masked one)."""
    n_chunks = alignment.n_chunks
    phi = np.zeros(n_chunks)
    ids = rows
    prompt_len = len(ids) - response_len
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), dim=-1)
    for c in range(n_chunks):
        u = int(np.flatnonzero(chunk_of == c).max())
        p = prompt_len + u  # the token's position; its distribution sits at p - 1
        token = int(ids[p])
        mass = _brute_extension_log_mass(log_probs[p - 1], token, table, special)
        phi[c] = mass - float(log_probs[p - 1, token])
    if ended:
        phi[-1] = 0.0
    phi[alignment.mask_reason != KEPT] = 0.0
    return phi


def test_shaping_moves_each_chunk_by_both_potentials_and_keeps_the_sequence_sum(other_view):
    """``shaping=both``: the written-back shift is ΔΦ_S − ΔΦ_T from brute-force potentials of both models,
    it sums to 0 over a response that ended, and ``xtok_teacher_lp`` is ``T_c`` minus it."""
    tokenizer, student_view, scorer, student, teacher, (student_special, teacher_special) = other_view
    responses = [tokenizer.encode("#### 1234") + [tokenizer.eos_token_id], tokenizer.encode("#### 57 and 8")]
    responses.append(tokenizer.encode("#### 99") + [tokenizer.eos_token_id])
    data = _batch(tokenizer, student_view, responses)
    teacher_batch, alignments, flags = scorer.to_teacher(data)
    teacher_rows = list(teacher_batch["input_ids"].unbind())
    output = _verl_like_output(teacher, teacher_rows, scorer.teacher_hook)
    student_output = _verl_like_output(student, list(data["input_ids"].unbind()), scorer.student_hook)
    fields = scorer.to_student(output, teacher_batch, data, alignments, flags, student_output)
    plain = OwnViewScorer(tokenizer, student_view, scorer.view, [tokenizer.eos_token_id], 8192)
    unshaped = plain.to_student(output, teacher_batch, data, alignments, flags)
    moved = 0.0
    for i, (alignment, response) in enumerate(zip(alignments, responses, strict=True)):
        ended = response[-1] == tokenizer.eos_token_id
        n_teacher = len(teacher_batch["responses"][i])
        phi_t = _potentials(
            teacher,
            teacher_rows[i],
            scorer.view.encoder.table,
            teacher_special,
            alignment.teacher_chunk,
            alignment,
            n_teacher,
            ended,
        )
        phi_s = _potentials(
            student,
            data["input_ids"][i],
            scorer.student_table,
            student_special,
            alignment.student_chunk,
            alignment,
            len(response),
            ended,
        )
        want = np.diff(phi_s, prepend=0.0) - np.diff(phi_t, prepend=0.0)
        shift = fields["xtok_shift"][i].double().numpy()
        is_last = np.append(alignment.student_chunk[1:] != alignment.student_chunk[:-1], True)
        np.testing.assert_allclose(shift[is_last], want, atol=1e-5)
        assert not shift[~is_last].any()
        if ended:
            assert abs(shift.sum()) < 1e-5  # potential-based: the sequence's log-ratio is unchanged
        got_lp = fields["xtok_teacher_lp"][i].double().numpy()
        np.testing.assert_allclose(got_lp, unshaped["xtok_teacher_lp"][i].double().numpy() - shift, atol=1e-5)
        assert torch.equal(fields["log_probs"][i], unshaped["log_probs"][i])  # metrics keep the real log-probs
        moved += float(np.abs(want).sum())
    assert moved > 1e-3  # two tokenisers of digit runs: the lookahead is real, so the check is not 0 == 0
    assert not unshaped["xtok_shift"].values().any()


def test_shaping_of_a_copy_of_the_student_moves_nothing(other_view):
    """The same model and tokenizer on both sides: Φ_S = Φ_T at every chunk, so ``both`` changes no score.

    The other family's tokenizer has merges (digit groups, words), so its tokens do carry lookahead: one side
    alone moves the scores, and both sides cancel exactly.
    """
    _, _, _, _, model, _ = other_view
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    view = TeacherView(tokenizer)
    eos = [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    scorers = {side: OwnViewScorer(tokenizer, view, view, eos, 8192, shaping=side) for side in ("both", "teacher")}
    responses = [tokenizer.encode(text, add_special_tokens=False) + eos for text in ("#### 1234", "#### 57 and 8")]
    data = _batch(tokenizer, view, responses)
    teacher_batch, alignments, flags = scorers["both"].to_teacher(data)
    assert all(a.n_chunks == len(r) for a, r in zip(alignments, responses, strict=True))  # one token per chunk
    output = _verl_like_output(model, list(teacher_batch["input_ids"].unbind()), scorers["both"].teacher_hook)
    student_output = _verl_like_output(model, list(data["input_ids"].unbind()), scorers["both"].student_hook)
    both = scorers["both"].to_student(output, teacher_batch, data, alignments, flags, student_output)
    teacher_only = scorers["teacher"].to_student(output, teacher_batch, data, alignments, flags)
    assert not both["xtok_shift"].values().any()
    assert teacher_only["xtok_shift"].values().abs().max() > 1e-3
