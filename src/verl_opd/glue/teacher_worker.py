"""The teacher in verl's reference slot.

verl builds its reference model from a copy of the student's model config, through
``ActorRolloutRefWorker.ref_worker_cls`` (a ``TrainingWorker``). :class:`OPDWorker`
points that hook at :class:`TeacherWorker`, which swaps in the teacher's model and
the teacher's placement before verl's engine is built. Both the teacher and the
student (``actor_worker_cls``) are :class:`~verl_opd.glue.precision.FP32HeadWorker` instances: their
logits come from an fp32 LM head whatever their body computes in. Everything else
(FSDP, mixed precision, micro-batching, log-prob computation) is verl's own code path,
so the teacher scores exactly the token ids, attention masks and positions verl gives
the student.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
import verl.utils.tensordict_utils as tu
from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.config import FSDPOptimizerConfig, HFModelConfig, MtpConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker, TrainingWorkerConfig

from verl_opd.config.opd_config import (
    CHAT_TEMPLATE_KWARGS_KEY,
    PRECISION_NAMES,
    SHAPING_BOTH,
    SHAPING_NONE,
    VIEW_OWN,
    OPDConfig,
)
from verl_opd.core.routing import dotted_field
from verl_opd.glue import policy_loss
from verl_opd.glue.own_view import OwnViewScorer
from verl_opd.glue.precision import FP32HeadWorker
from verl_opd.glue.shaping import extension_pass

logger = logging.getLogger(__name__)


def teacher_model_config(ref_model: HFModelConfig, teacher_path: str) -> HFModelConfig:
    """verl's reference-model config with the teacher swapped in: what the ref slot builds, minus the student.

    verl builds its ref model from a deep copy of the student's ``HFModelConfig`` with MTP
    forced off (verl/workers/engine_workers.py:556-557). Everything that describes the run
    (``use_remove_padding``, fused kernels, ``trust_remote_code``, ``use_shm``) is kept;
    what describes the student is replaced:

    * path, tokenizer and HF config: the teacher's (``hf_config_path`` and ``tokenizer_path``
      reset to ``None`` follow ``path``, verl/workers/config/model.py:151-154; ``__post_init__``
      then reloads the tokenizer and the HF config from there, model.py:156-222);
    * ``override_config``: the student's HF-config overrides (dropout, rope, ...) are about the
      student's architecture and must not reach the teacher's. ``attn_implementation`` is kept:
      it depends on the run's hardware and installed kernels (verl defaults it to
      flash_attention_2, model.py:185; a CPU run needs sdpa), not on the model;
    * MTP off (as verl's ref, and so ``__post_init__`` zeroes MTP layer counts, model.py:238-244);
    * no LoRA: a LoRA rank makes verl wrap the teacher in a PEFT adapter (fsdp/transformer_impl.py:162, :598-599);
    * no gradient checkpointing or activation offload (transformer_impl.py:335, :477-479): the
      teacher only runs forward passes and keeps no activations.
    """
    overrides = ref_model.override_config
    return dataclasses.replace(
        ref_model,
        path=teacher_path,
        hf_config_path=None,
        tokenizer_path=None,
        override_config={k: overrides[k] for k in ("attn_implementation",) if k in overrides},
        mtp=MtpConfig(enable=False),
        lora_rank=0,
        lora={},
        lora_adapter_path=None,
        enable_gradient_checkpointing=False,
        enable_activation_offload=False,
    )


class TeacherWorker(FP32HeadWorker):
    """A forward-only ``TrainingWorker`` holding the teacher instead of a copy of the student.

    Its compute precision (``mixed_precision``) and storage dtype (``model_dtype``) are the ref
    slot's ``fsdp_config``, which the driver sets from ``opd.precision`` and ``opd.teacher.dtype``.

    ``offload=False`` builds the engine as a resident model: verl's forward-only
    engines always stream weights from pinned host memory at every forward, so the
    resident teacher is built like a trainable model whose optimizer never steps
    (AdamW allocates its state lazily at the first step, so it costs no memory).
    """

    def __init__(
        self,
        config: TrainingWorkerConfig,
        teacher_path: str,
        offload: bool,
        own_view: Mapping[str, Any] | None = None,
    ):
        # The ref slot's model config is verl's copy of the student's (its tokenizer, its model type).
        student_model = config.model_config
        teacher_model = teacher_model_config(config.model_config, teacher_path)
        engine_config = dataclasses.replace(config.engine_config, forward_only=offload)
        # The resident engine builds an optimizer; one that never steps (lr 0, no weight decay).
        optimizer_config = FSDPOptimizerConfig(lr=0.0, weight_decay=0.0, total_training_steps=1)
        config = dataclasses.replace(
            config, model_config=teacher_model, engine_config=engine_config, optimizer_config=optimizer_config
        )
        super().__init__(config)
        logger.warning(
            "verl-opd: teacher %s loaded in the reference slot (stored as %s, computing in %s, fp32 LM head, "
            "offload=%s)",
            teacher_model.path,
            engine_config.model_dtype,
            engine_config.mixed_precision["param_dtype"],
            offload,
        )
        self._own_view = None
        self._student: TrainingWorker | None = None
        if own_view is not None:
            self._own_view = _own_view_scorer(student_model, self.model_config, own_view)

    def attach_student(self, student: TrainingWorker) -> None:
        """The actor whose forward gives the student's potentials (``opd.teacher.shaping=both``).

        Both engines live in this process (verl builds the actor and the ref side by side,
        verl/workers/engine_workers.py:587, :644), so the student's forward is a local call that every rank
        makes with its peers, as the teacher's is.
        """
        self._student = student

    def infer_batch(self, data: TensorDict) -> TensorDict | None:
        """verl's forward on the student's tokens, or, with ``opd.teacher.view=own``, on the teacher's own view.

        The own view re-renders each sample for the teacher, runs the same verl forward on that batch
        and maps the log-probs back onto the student's tokens by byte-aligned chunks
        (:mod:`verl_opd.glue.own_view`). With ``opd.teacher.shaping`` on, the teacher's forward also returns
        each position's extension mass, and with ``both`` the student's actor runs one forward on ``data``
        (:mod:`verl_opd.glue.shaping`); every rank runs both forwards before any returns. Ranks that hold no
        output (tensor/sequence parallel peers, ``is_mp_src_rank_with_outputs``) return None, as verl's own
        method does.
        """
        scorer = self._own_view
        if scorer is None:
            return super().infer_batch(data)
        teacher_batch, alignments, flags = scorer.to_teacher(data)
        if scorer.shaping == SHAPING_NONE:
            output = super().infer_batch(teacher_batch)
        else:
            with extension_pass(self, scorer.teacher_hook, teacher_batch):
                output = super().infer_batch(teacher_batch)
        student_output = None
        if scorer.shaping == SHAPING_BOTH:
            if self._student is None:
                raise RuntimeError("verl-opd: opd.teacher.shaping=both needs the student: call attach_student first")
            student_batch = data.copy()  # a shallow copy: the hook's flags stay off ``data``
            with extension_pass(self._student, scorer.student_hook, student_batch):
                student_output = self._student.infer_batch(student_batch)
        if output is None:
            return None
        return scorer.to_student(output, teacher_batch, data, alignments, flags, student_output)


def _own_view_scorer(
    student_model: HFModelConfig, teacher_model: HFModelConfig, own_view: Mapping[str, Any]
) -> OwnViewScorer:
    """The own-view scorer for this worker's teacher; ``own_view`` holds the ``opd.teacher`` view keys."""
    student_tokenizer = student_model.tokenizer
    from verl_opd.teacher_view.render import TeacherView

    chat_template_kwargs = own_view.get("chat_template_kwargs") or {}
    view = TeacherView(
        teacher_model.tokenizer,
        system_prompt=own_view.get("system_prompt"),
        context_key=own_view.get("context_key"),
        hf_model_type=getattr(teacher_model.hf_config, "model_type", None),
        chat_template_kwargs=chat_template_kwargs,
    )
    student_view = TeacherView(
        student_tokenizer,
        hf_model_type=getattr(student_model.hf_config, "model_type", None),
        chat_template_kwargs=chat_template_kwargs,
    )
    eos = student_tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    max_len = int(getattr(teacher_model.hf_config, "max_position_embeddings", 0) or 0) or 1 << 62
    logger.warning(
        "verl-opd: the teacher reads its own view (opd.teacher.view=own): its chat template, its tokenizer, "
        "end of turn %s, shaping %s%s%s",
        view.end_of_turn,
        own_view.get("shaping") or SHAPING_NONE,
        ", a system prompt only it reads" if view.system_prompt else "",
        f", context from {view.context_key}" if view.context_key else "",
    )
    return OwnViewScorer(
        student_tokenizer, student_view, view, eos_ids, max_len, shaping=own_view.get("shaping") or SHAPING_NONE
    )


# The per-row teacher index the reference worker writes back with the log-probs (several teachers only):
# the trainer reads it for the per-teacher metrics and KL coefficients.
TEACHER_INDEX_FIELD = "opd_teacher_index"
# Per row, the wall time (s) of its teacher's forward on the rank that scored it this step (several teachers only):
# the trainer logs its max per teacher as opd/<name>/forward_s (per_teacher_metrics).
TEACHER_FORWARD_S_FIELD = "opd_teacher_forward_s"


class TeacherSet:
    """Several teachers in the one reference slot: each sample is scored by its own teacher only.

    verl builds one reference worker per process (``ActorRolloutRefWorker.ref``, engine_workers.py:587) and
    calls ``self.ref.infer_batch`` on the step's batch (:697); this stands in that place with one
    :class:`TeacherWorker` (its own verl engine, FSDP mesh and placement: resident or offloaded, stored in its
    own ``dtype``) per teacher, as verl keeps the actor's and the ref's engines side by side in one process.
    :meth:`infer_batch` splits the batch by :class:`~verl_opd.core.routing.TeacherRoutes`, runs each teacher's
    forward on its rows only and reassembles ``log_probs`` in the batch's order, with
    :data:`TEACHER_INDEX_FIELD` per row.

    Collectives: a teacher's FSDP forward all-gathers its weights on every rank of its data-parallel group, so
    every rank must run as many forwards of each teacher as its peers. The split is uneven across ranks (one
    rank may hold no sample of a teacher), so each rank pads each teacher's rows, with copies of one of its rows
    whose outputs are dropped, to the largest count any rank holds (one all-reduce of the counts per step),
    cut into even micro-batches (:meth:`_forward_sizes`). With equal row counts verl's fixed micro-batching
    gives every rank the same number of forwards (its dynamic batching syncs the count itself). A teacher no
    rank has a sample for runs no forward anywhere.

    Forward time: each row carries :data:`TEACHER_FORWARD_S_FIELD`, the wall time of its teacher's
    ``infer_batch`` on this rank (padded rows included; it ends with verl's copy of the outputs to host,
    engine_workers.py:437, so queued device work is counted). It travels per row, with the log-probs,
    because verl drops the ref worker's ``metrics`` (trainer_base.py:1709-1717 keeps only ``log_probs``).
    """

    def __init__(self, config: TrainingWorkerConfig, opd: OPDConfig) -> None:
        self.names = [name for name, _, _ in opd.teacher_list()]
        self.routes = opd.routes()
        self.teacher_field = opd.teacher_field
        self._padding_only_shown: set[int] = set()
        self.workers = [
            TeacherWorker(
                dataclasses.replace(
                    config,
                    engine_config=dataclasses.replace(config.engine_config, model_dtype=PRECISION_NAMES[teacher.dtype]),
                ),
                teacher_path=teacher.model_path,
                offload=teacher.offload,
            )
            for _, _, teacher in opd.teacher_list()
        ]

    def reset(self) -> None:
        for worker in self.workers:
            worker.reset()

    def get_dispatch_collect(self) -> Any:  # noqa: ANN401 - verl's dispatch info, passed through
        """Every teacher's engine has the same layout (the ref slot's ranks); verl dispatches by the first's."""
        return self.workers[0].get_dispatch_collect()

    def teacher_indices(self, data: TensorDict) -> list[int]:
        """Each row's teacher (:meth:`TeacherRoutes.index`); the driver's scan makes an unrouted row unexpected."""
        sources = data["data_source"]
        top = self.teacher_field.split(".")[0] if self.teacher_field else None
        indices = []
        for row, source in enumerate(sources):
            named = None
            if top is not None and top in data.keys():
                named = dotted_field({top: data[top][row]}, self.teacher_field)
            index = self.routes.index(source, named)
            if index is None:
                raise ValueError(
                    f"verl-opd: a sample with data_source={source!r}"
                    + (f" and {self.teacher_field}={named!r}" if top else "")
                    + f" has no teacher among opd.teachers {self.names}; add it to a teacher's data_sources."
                )
            indices.append(index)
        return indices

    def _forward_sizes(self, data: TensorDict, counts: list[int]) -> list[tuple[int, int | None]]:
        """Per teacher, ``(rows this rank runs, micro-batch size)``; the size is None with dynamic batching.

        The rows are the most any rank of the data-parallel group holds. With fixed micro-batches verl asserts
        that they divide the batch (verl/workers/engine/utils.py:124): the teacher runs as many micro-batches
        as the ref's ``log_prob_micro_batch_size_per_gpu`` needs for those rows, each as even as it can be
        (never larger than that setting), so at most one padded row per micro-batch.
        """
        worker = self.workers[0]
        engine = worker.engine
        if engine.get_data_parallel_size() > 1:
            largest = torch.tensor(counts, dtype=torch.long, device=worker.device_name)
            torch.distributed.all_reduce(
                largest, op=torch.distributed.ReduceOp.MAX, group=engine.get_data_parallel_group()
            )
            counts = largest.tolist()
        if tu.get(data, "use_dynamic_bsz", default=worker.engine_config.use_dynamic_bsz):
            return [(count, None) for count in counts]
        micro = tu.get(data, "micro_batch_size_per_gpu") or worker.engine_config.infer_micro_batch_size_per_gpu
        sizes = []
        for count in counts:
            n_micro = -(-count // micro)
            even = -(-count // n_micro) if n_micro else micro
            sizes.append((n_micro * even, even))
        return sizes

    def infer_batch(self, data: TensorDict) -> TensorDict | None:
        """Each teacher's log-probs on its own rows, reassembled in the batch's order (None on non-output ranks)."""
        indices = self.teacher_indices(data)
        rows = [[row for row, index in enumerate(indices) if index == k] for k in range(len(self.workers))]
        token_counts = tu.get(data, "global_token_num")
        outputs: list[TensorDict | None] = []
        forward_s = [0.0] * len(self.workers)
        sizes = self._forward_sizes(data, [len(r) for r in rows])
        for k, (worker, own, (target, micro)) in enumerate(zip(self.workers, rows, sizes, strict=True)):
            if target == 0:
                outputs.append(None)
                continue
            selected = own + [own[0] if own else 0] * (target - len(own))
            if not own and k not in self._padding_only_shown:
                self._padding_only_shown.add(k)
                logger.warning(
                    "verl-opd: this rank holds no sample of teacher %r this step; it runs %d padded rows through it, "
                    "as its data-parallel peers do, so FSDP's collectives stay in step (logged once per teacher)",
                    self.names[k],
                    target,
                )
            sub = tu.index_select_tensor_dict(data, selected)
            if micro is not None:
                tu.assign_non_tensor(sub, micro_batch_size_per_gpu=micro)
            if isinstance(token_counts, list) and len(token_counts) == len(indices):
                tu.assign_non_tensor(sub, global_token_num=[token_counts[row] for row in selected])
            start = time.perf_counter()
            output = worker.infer_batch(sub)
            forward_s[k] = time.perf_counter() - start
            # A rank with no row of this teacher ran padding only, for its peers' collectives: nothing to keep
            # (verl's index_select cannot select no row of a nested tensor).
            kept = output is not None and bool(own)
            outputs.append(tu.index_select_tensor_dict(output, list(range(len(own)))) if kept else None)
        produced = [(own, out) for own, out in zip(rows, outputs, strict=True) if own]
        if any(out is None for _, out in produced):
            return None
        order = [row for own, _ in produced for row in own]
        merged = tu.concat_tensordict([out.exclude("metrics") for _, out in produced])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        result = tu.index_select_tensor_dict(merged, inverse)
        result[TEACHER_INDEX_FIELD] = torch.nested.as_nested_tensor(
            [torch.tensor([index]) for index in indices], layout=torch.jagged
        )
        result[TEACHER_FORWARD_S_FIELD] = torch.nested.as_nested_tensor(
            [torch.tensor([forward_s[index]], dtype=torch.float32) for index in indices], layout=torch.jagged
        )
        metrics = {
            f"{self.names[k]}/{key}": value
            for k, out in enumerate(outputs)
            if out is not None and "metrics" in out.keys()
            for key, value in out.get("metrics").data.items()
        }
        result.set_non_tensor("metrics", metrics)
        return result


class OPDWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker with the teacher in the ref slot and fp32 LM heads on both models.

    With the recompute skipped (``opd.recompute`` resolved to ``never``) it also registers, in this
    process where verl's update looks it up, the ``opd_onpolicy`` policy loss with the run's settings.
    """

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        opd = self.config.opd
        if opd.recompute == "never":
            policy_loss.register(kl_coef=opd.kl_coef, discount=opd.discount)
        self.actor_worker_cls = FP32HeadWorker
        if opd.get("teachers"):
            self.ref_worker_cls = functools.partial(TeacherSet, opd=OPDConfig.from_config(self.config))
            super().init_model()
            return
        own_view = None
        if opd.teacher.view == VIEW_OWN:
            own_view = {
                "system_prompt": opd.teacher.system_prompt,
                "context_key": opd.teacher.context_key,
                # data.apply_chat_template_kwargs, copied here by the driver (workers get actor_rollout_ref only).
                "chat_template_kwargs": self.config.get(CHAT_TEMPLATE_KWARGS_KEY),
                "shaping": opd.teacher.shaping,  # resolved by the driver (opd_config.resolve_shaping)
            }
        self.ref_worker_cls = functools.partial(
            TeacherWorker, teacher_path=opd.teacher.model_path, offload=opd.teacher.offload, own_view=own_view
        )
        super().init_model()
        if opd.teacher.view == VIEW_OWN and opd.teacher.shaping == SHAPING_BOTH:
            self.ref.attach_student(self.actor)
