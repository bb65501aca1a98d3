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
from collections.abc import Mapping
from typing import Any

from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.config import FSDPOptimizerConfig, HFModelConfig, MtpConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorkerConfig

from verl_opd.config.opd_config import CHAT_TEMPLATE_KWARGS_KEY
from verl_opd.glue import policy_loss
from verl_opd.glue.own_view import OwnViewScorer
from verl_opd.glue.precision import FP32HeadWorker

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
        if own_view is not None:
            self._own_view = _own_view_scorer(student_model, self.model_config, own_view)

    def infer_batch(self, data: TensorDict) -> TensorDict | None:
        """verl's forward on the student's tokens, or, with ``opd.teacher.view=own``, on the teacher's own view.

        The own view re-renders each sample for the teacher, runs the same verl forward on that batch
        and maps the log-probs back onto the student's tokens by byte-aligned chunks
        (:mod:`verl_opd.glue.own_view`). Ranks that hold no output (tensor/sequence parallel peers,
        ``is_mp_src_rank_with_outputs``) return None, as verl's own method does.
        """
        if self._own_view is None:
            return super().infer_batch(data)
        teacher_batch, alignments, flags = self._own_view.to_teacher(data)
        output = super().infer_batch(teacher_batch)
        if output is None:
            return None
        return self._own_view.to_student(output, teacher_batch, data, alignments, flags)


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
        "end of turn %s%s%s",
        view.end_of_turn,
        ", a system prompt only it reads" if view.system_prompt else "",
        f", context from {view.context_key}" if view.context_key else "",
    )
    return OwnViewScorer(student_tokenizer, student_view, view, eos_ids, max_len)


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
        own_view = None
        if opd.teacher.view == "own":
            own_view = {
                "system_prompt": opd.teacher.system_prompt,
                "context_key": opd.teacher.context_key,
                # data.apply_chat_template_kwargs, copied here by the driver (workers get actor_rollout_ref only).
                "chat_template_kwargs": self.config.get(CHAT_TEMPLATE_KWARGS_KEY),
            }
        self.ref_worker_cls = functools.partial(
            TeacherWorker, teacher_path=opd.teacher.model_path, offload=opd.teacher.offload, own_view=own_view
        )
        super().init_model()
