"""The teacher in verl's reference slot.

verl builds its reference model from a copy of the student's model config, through
``ActorRolloutRefWorker.ref_worker_cls`` (a ``TrainingWorker``). :class:`OPDWorker`
points that hook at :class:`TeacherWorker`, which swaps in the teacher's model and
the teacher's precision and placement before verl's engine is built. Everything
else (FSDP, micro-batching, log-prob computation) is verl's own code path, so the
teacher scores exactly the token ids, attention masks and positions verl gives
the student.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf
from verl.single_controller.base.decorator import Dispatch, register
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import FSDPOptimizerConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker, TrainingWorkerConfig

from verl_opd.opd_config import teacher_precision

logger = logging.getLogger(__name__)


def teacher_model_config(student_model: DictConfig, teacher_path: str) -> Any:
    """The student's model node with the teacher's path (tokenizer and HF config follow the path)."""
    node = OmegaConf.merge(
        student_model,
        {
            "path": teacher_path,
            "hf_config_path": None,
            "tokenizer_path": None,
            "lora_rank": 0,
            "lora_adapter_path": None,
        },
    )
    return omega_conf_to_dataclass(node)


class TeacherWorker(TrainingWorker):
    """A forward-only ``TrainingWorker`` holding the teacher instead of a copy of the student.

    ``offload=False`` builds the engine as a resident model: verl's forward-only
    engines always stream weights from pinned host memory at every forward, so the
    resident teacher is built like a trainable model whose optimizer never steps
    (AdamW allocates its state lazily at the first step, so it costs no memory).
    """

    def __init__(self, config: TrainingWorkerConfig, teacher_model: Any, dtype: str, offload: bool):
        engine_config = dataclasses.replace(
            config.engine_config, forward_only=offload, mixed_precision=teacher_precision(dtype)
        )
        # The resident engine builds an optimizer; one that never steps (lr 0, no weight decay).
        optimizer_config = FSDPOptimizerConfig(lr=0.0, weight_decay=0.0, total_training_steps=1)
        config = dataclasses.replace(
            config, model_config=teacher_model, engine_config=engine_config, optimizer_config=optimizer_config
        )
        super().__init__(config)
        logger.warning(
            "verl-opd: teacher %s loaded in the reference slot (dtype=%s, offload=%s)",
            teacher_model.path,
            dtype,
            offload,
        )


class OPDWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker with the teacher in the ref slot."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        opd = self.config.opd
        self.ref_worker_cls = functools.partial(
            TeacherWorker,
            teacher_model=teacher_model_config(self.config.model, opd.teacher.model_path),
            dtype=opd.teacher.dtype,
            offload=opd.teacher.offload,
        )
        super().init_model()
