"""``opd.teacher.view=own`` inside the teacher worker: the student's batch in, the teacher's chunks out.

verl's reference worker receives the step's samples as a ``TensorDict`` of jagged tensors in the
student's geometry (``prompts``, ``responses``, ``response_mask``, ``input_ids``, ``position_ids``) plus
every dataset field TransferQueue keeps, ``raw_prompt`` (the conversation's messages) among them
(verl/utils/dataset/rl_dataset.py sets it for every row; the agent loop stores every field). The
teacher worker (:class:`~verl_opd.glue.teacher_worker.TeacherWorker`) hands that batch to
:meth:`OwnViewScorer.to_teacher`, runs verl's own forward (``TrainingWorker.infer_batch``: engine,
micro-batching, fp32 head) on the teacher-geometry batch it returns, and hands the output to
:meth:`OwnViewScorer.to_student`, which returns what verl writes back to TransferQueue:

* ``log_probs``: in the student's geometry, each chunk's teacher log-prob ``T_c`` spread evenly over
  the chunk's student tokens (sums per chunk and per sequence are kept). verl turns it into
  ``ref_log_prob``; only the ``opd/*`` metrics read it.
* ``xtok_chunk`` (chunk index of each student response token), ``xtok_reason`` (its chunk's mask
  reason, :data:`verl_opd.core.xtok.MASK_REASONS`), ``xtok_teacher_lp`` (``T_c`` on the chunk's last
  student token), ``xtok_teacher_n`` (the chunk's teacher token count, on the same token) and
  ``xtok_noncanonical`` (the guard's per-token flag) and ``xtok_shift`` (the chunk's potential shift, on its
  last student token): what the trainer's advantage step and the ``opd/xtok/*`` metrics read
  (:func:`verl_opd.core.xtok.token_chunk_metrics`).

With ``opd.teacher.shaping`` on, ``xtok_teacher_lp`` is the shaped chunk score ``T_c - shift_c`` with
``shift_c = ΔΦ_S - ΔΦ_T`` (:func:`verl_opd.core.xtok_shaping.potential_shift`), so the trainer's
``S_c - T'_c`` is the shaped log-ratio ``d'_c``. The potentials come from the forwards' per-position
extension masses (:mod:`verl_opd.glue.shaping`): the teacher's from its own forward, the student's
(``shaping=both``) from one more forward of the actor on the student's batch. ``log_probs`` stays the
teacher's plain log-prob, so ``opd/reverse_kl`` and the other metrics report the real divergence.

Re-tokenising here rather than on the driver keeps the work parallel across the teacher's ranks and
TransferQueue free of a second geometry (design note, section 3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, TensorDict
from verl.workers.utils.padding import response_from_nested

from verl_opd.config.opd_config import SHAPING_BOTH, SHAPING_NONE
from verl_opd.core.xtok import (
    KEPT,
    PROMPT_CUT,
    ChunkAlignment,
    align_chunks,
    mask_sample,
    noncanonical_tokens,
    response_text,
)
from verl_opd.core.xtok_shaping import potential_shift, teacher_potential
from verl_opd.glue.shaping import EXTENSION_FIELD, ExtensionMassHook
from verl_opd.teacher_view.byte_tables import added_token_ids, byte_table, canonical_ids
from verl_opd.teacher_view.render import TeacherView

logger = logging.getLogger(__name__)

# Fields written back in the student's geometry (response tokens), read by the trainer's advantage step.
XTOK_FIELDS = ("xtok_chunk", "xtok_reason", "xtok_teacher_lp", "xtok_teacher_n", "xtok_noncanonical", "xtok_shift")


def _jagged(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def _rows(nested: torch.Tensor) -> list[torch.Tensor]:
    return list(nested.unbind())


class OwnViewScorer:
    """Re-renders a batch for the teacher and maps the teacher's log-probs back onto the student's tokens."""

    def __init__(
        self,
        student_tokenizer: Any,
        student_view: TeacherView,
        view: TeacherView,
        eos_token_ids: Sequence[int],
        teacher_max_len: int,
        shaping: str = SHAPING_NONE,
    ) -> None:
        self.student_tokenizer = student_tokenizer
        # The student's own rendering of a conversation: a prompt verl gave the student that differs from it
        # was cut by the rollout's prompt length (actor_rollout_ref.rollout.prompt_length).
        self.student_view = student_view
        self.student_table = byte_table(student_tokenizer)
        self.student_added = np.array(sorted(added_token_ids(student_tokenizer)), dtype=np.int64)
        self.eos_ids = frozenset(int(i) for i in eos_token_ids)
        self.view = view
        self.teacher_max_len = teacher_max_len
        self.shaping = shaping  # resolved: none | teacher | both (opd_config.resolve_shaping)
        self.teacher_hook = ExtensionMassHook(view.encoder.table, added_token_ids(view.tokenizer))
        self.student_hook = ExtensionMassHook(self.student_table, self.student_added.tolist())
        self._shown = False

    def _context_fields(self, data: TensorDict, index: int) -> dict[str, Any]:
        """Sample ``index``'s dataset fields (for ``opd.teacher.context_key``), by their top-level names."""
        if self.view.context_key is None:
            return {}
        top = self.view.context_key.split(".")[0]
        if top not in data.keys():
            raise KeyError(
                f"opd.teacher.context_key={self.view.context_key!r}: the batch has no field {top!r} (it has "
                f"{sorted(str(k) for k in data.keys())}); set it to a field of the training data"
            )
        return {top: data[top][index]}

    def to_teacher(self, data: TensorDict) -> tuple[TensorDict, list[ChunkAlignment], list[np.ndarray]]:
        """The teacher-geometry batch verl's engine scores, each sample's chunk alignment and guard flags.

        Per sample: the student's response ids (EOS last when it ended) give the response bytes
        (byte table, never a decode); the teacher reads :func:`~verl_opd.core.xtok.response_text` of
        them, encoded by its own tokenizer, after its own rendering of ``raw_prompt``. A response that
        did not end with EOS was cut by ``max_response_length``: its last chunk is masked.
        """
        responses, masks = _rows(data["responses"]), _rows(data["response_mask"])
        raw_prompts = data["raw_prompt"]
        ended, texts, text_ids = [], [], []
        for index, (ids, mask) in enumerate(zip(responses, masks, strict=True)):
            mask_np = mask.numpy().astype(bool)
            if not mask_np.all():
                raise ValueError(
                    f"opd.teacher.view=own scores single-turn responses; sample {index} has response_mask holes "
                    "(multi-turn or tool output). Use opd.teacher.view=student for multi-turn rollouts."
                )
            ids_np = ids.numpy().astype(np.int64)
            end = ids_np.size > 0 and int(ids_np[-1]) in self.eos_ids
            ended.append(end)
            text_ids.append(ids_np[:-1] if end else ids_np)
            texts.append(response_text(text_ids[-1], self.student_table))
        teacher_responses = self.view.response_ids([text.encode("utf-8") for text in texts], ended)

        alignments, flags, prompt_rows, response_rows = [], [], [], []
        rows = zip(text_ids, texts, ended, teacher_responses, strict=True)
        for index, (ids, text, end, teacher_ids) in enumerate(rows):
            prompt = self.view.prompt_ids(raw_prompts[index], self._context_fields(data, index))
            if len(prompt) + len(teacher_ids) > self.teacher_max_len:
                raise ValueError(
                    f"sample {index}: the teacher's view is {len(prompt)} prompt + {len(teacher_ids)} response tokens, "
                    f"over the teacher's max_position_embeddings {self.teacher_max_len}; lower "
                    "data.max_prompt_length / data.max_response_length"
                )
            noncanonical = noncanonical_tokens(
                ids, canonical_ids(self.student_tokenizer, text.encode("utf-8")), self.student_table
            )
            alignments.append(
                align_chunks(
                    responses[index].numpy().astype(np.int64),
                    np.asarray(teacher_ids, dtype=np.int64),
                    self.student_table,
                    self.view.encoder.table,
                    student_eos=end,
                    teacher_eot_len=len(self.view.end_of_turn) if end else 0,
                    truncated=not end,
                    noncanonical=noncanonical,
                    student_special=np.isin(ids, self.student_added),
                )
            )
            flags.append(np.append(noncanonical, False) if end else noncanonical)
            student_prompt = data["prompts"][index].tolist()
            if student_prompt != self.student_view.prompt_ids(raw_prompts[index]):
                alignments[-1] = mask_sample(alignments[-1], PROMPT_CUT)
            if not self._shown:
                self._shown = True
                logger.warning(
                    "verl-opd: opd.teacher.view=own, first sample: the student read %r, the teacher reads %r",
                    self.student_tokenizer.decode(student_prompt),
                    self.view.tokenizer.decode(prompt),
                )
            prompt_rows.append(torch.tensor(prompt, dtype=torch.long))
            response_rows.append(torch.tensor(teacher_ids, dtype=torch.long))

        full = [torch.cat([p, r]) for p, r in zip(prompt_rows, response_rows, strict=True)]
        ones = [torch.ones(len(r), dtype=torch.long) for r in response_rows]
        teacher = TensorDict(
            {
                "input_ids": _jagged(full),
                "position_ids": _jagged([torch.arange(len(row)) for row in full]),
                "prompts": _jagged(prompt_rows),
                "responses": _jagged(response_rows),
                "response_mask": _jagged(ones),
                "loss_mask": _jagged([m.clone() for m in ones]),
            },
            batch_size=[len(full)],
        )
        # The batch-wide settings verl attached (temperature, compute_loss, calculate_entropy, ...).
        for key in data.keys():
            value = data.get(key)
            if isinstance(value, NonTensorData):
                teacher.set_non_tensor(key, value.data)
        return teacher, alignments, flags

    def _shifts(
        self,
        output: TensorDict,
        teacher_batch: TensorDict,
        data: TensorDict,
        alignments: Sequence[ChunkAlignment],
        student_output: TensorDict | None,
    ) -> list[np.ndarray]:
        """Each sample's per-chunk potential shift ``ΔΦ_S - ΔΦ_T`` (zeros with ``shaping=none``).

        Φ at a chunk's last token is its extension log-mass minus its log-prob, from the same forward. It is 0
        after a response's EOS, and at the end of a masked chunk: the chunk's own score is dropped, and its
        tokens (a stray byte the teacher reads as U+FFFD, a tag) give no lookahead worth moving onto the next
        chunk. Any potential keeps the shaping's telescoping, so a finished response's sum is unchanged.
        """
        if self.shaping == SHAPING_NONE:
            return [np.zeros(a.n_chunks) for a in alignments]
        ended = [bool(len(r)) and int(r[-1]) in self.eos_ids for r in _rows(data["responses"])]

        def potentials(out: TensorDict, mask: torch.Tensor, chunks: list[np.ndarray]) -> list[torch.Tensor]:
            lps = _rows(response_from_nested(out["log_probs"], mask))
            masses = _rows(response_from_nested(out[EXTENSION_FIELD], mask))
            phis = []
            for lp, mass, chunk, a, end in zip(lps, masses, chunks, alignments, ended, strict=True):
                phi = teacher_potential(lp.double(), mass.double(), chunk, a.n_chunks, ends_with_eos=end)
                phis.append(phi.masked_fill(torch.from_numpy(a.mask_reason != KEPT), 0.0))
            return phis

        phi_teacher = potentials(output, teacher_batch["response_mask"], [a.teacher_chunk for a in alignments])
        phi_student: list[torch.Tensor | None] = [None] * len(alignments)
        if self.shaping == SHAPING_BOTH:
            phi_student = potentials(student_output, data["response_mask"], [a.student_chunk for a in alignments])
        return [potential_shift(s, t).numpy() for s, t in zip(phi_student, phi_teacher, strict=True)]

    def to_student(
        self,
        output: TensorDict,
        teacher_batch: TensorDict,
        data: TensorDict,
        alignments: Sequence[ChunkAlignment],
        flags: Sequence[np.ndarray],
        student_output: TensorDict | None = None,
    ) -> TensorDict:
        """verl's teacher output mapped onto the student's tokens (see the module docstring for the fields).

        ``student_output``: the student's forward on ``data`` with :data:`~verl_opd.glue.shaping.EXTENSION_FIELD`
        (``shaping=both`` only); ``output`` carries that field too whenever shaping is on.
        """
        teacher = _rows(response_from_nested(output["log_probs"], teacher_batch["response_mask"]))
        shifts = self._shifts(output, teacher_batch, data, alignments, student_output)
        student_len = [len(row) for row in _rows(data["input_ids"])]
        fields: dict[str, list[torch.Tensor]] = {name: [] for name in ("log_probs", *XTOK_FIELDS)}
        rows = zip(alignments, flags, teacher, student_len, shifts, strict=True)
        for alignment, flag, lp, length, shift in rows:
            on_last = alignment.teacher_log_probs_on_student(lp.double().numpy())
            per_chunk = np.bincount(alignment.teacher_chunk, weights=lp.double().numpy(), minlength=alignment.n_chunks)
            spread = per_chunk[alignment.student_chunk] / alignment.student_tokens_per_chunk[alignment.student_chunk]
            # verl's model output is shifted left by one (the log-prob of token p sits at p - 1), and verl
            # reads the response's with response_from_nested (verl/workers/utils/padding.py:194).
            row = torch.zeros(length, dtype=torch.float32)
            n = len(spread)
            row[length - n - 1 : length - 1] = torch.from_numpy(spread).float()
            fields["log_probs"].append(row)
            teacher_n = np.zeros(n, dtype=np.int64)
            is_last = np.append(alignment.student_chunk[1:] != alignment.student_chunk[:-1], True)
            teacher_n[is_last] = alignment.teacher_tokens_per_chunk[alignment.student_chunk[is_last]]
            shift_on_last = np.where(is_last, shift[alignment.student_chunk], 0.0)
            fields["xtok_chunk"].append(torch.from_numpy(alignment.student_chunk.copy()))
            fields["xtok_reason"].append(
                torch.from_numpy(alignment.mask_reason[alignment.student_chunk].astype(np.int64))
            )
            fields["xtok_teacher_lp"].append(torch.from_numpy(on_last - shift_on_last).float())
            fields["xtok_shift"].append(torch.from_numpy(shift_on_last).float())
            fields["xtok_teacher_n"].append(torch.from_numpy(teacher_n))
            fields["xtok_noncanonical"].append(torch.from_numpy(flag.astype(np.int64)))
        result = TensorDict({name: _jagged(rows) for name, rows in fields.items()}, batch_size=[len(alignments)])
        if "metrics" in output.keys():
            result.set_non_tensor("metrics", output.get("metrics").data)
        return result
