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

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.config import FSDPOptimizerConfig, HFModelConfig, MtpConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorkerConfig

from verl_opd.glue import policy_loss
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

    def __init__(self, config: TrainingWorkerConfig, teacher_path: str, offload: bool):
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
        self.ref_worker_cls = functools.partial(
            TeacherWorker, teacher_path=opd.teacher.model_path, offload=opd.teacher.offload
        )
        super().init_model()
