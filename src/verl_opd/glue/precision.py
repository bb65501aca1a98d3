"""fp32 logits from a model whose body computes in bf16 (spec rule 10).

With ``opd.precision=bf16`` verl's FSDP engine runs each forward under
``torch.autocast(dtype=bf16)`` (verl/workers/engine/fsdp/transformer_impl.py:1559-1565) on
parameters that FSDP casts to bf16 (``MixedPrecisionPolicy(param_dtype=bf16)``,
transformer_impl.py:455-457). The HF model's ``lm_head`` is then a bf16 matmul, and its bf16
logits quantise every log-prob: verl log-softmaxes whatever ``output.logits`` holds
(transformer_impl.py:1382-1429 with ``use_remove_padding``, :1477-1522 without), and upcasting
afterwards cannot restore what the rounding lost.

:func:`install_fp32_head` makes the model's output embedding compute ``F.linear`` on fp32 copies
of its input and weight with autocast off, so the logits (and, downstream, verl's log-softmax)
are fp32. It changes the forward of one ``nn.Linear`` instance, never a class: parameters,
state dict, FSDP sharding hooks and the weights synced to the rollout engine are untouched.
:class:`FP32HeadWorker` installs it each time verl (re)builds the engine's module, so the
student's log-prob pass and its training forward use the same head (the PPO ratio compares
the two), and :class:`~verl_opd.glue.teacher_worker.TeacherWorker` inherits it for the teacher.

verl's fused LM head (``model.use_fused_kernels=True``) never calls ``lm_head``'s forward: it
reads the weight directly (verl/models/transformers/monkey_patch.py:246-286). Its ``triton``
backend accumulates the logits in fp32 tiles (verl/utils/kernel/kernels.py:271, :303), so it
already gives fp32 log-probs; its ``torch`` backend computes ``hidden @ weight.T`` in the
hidden states' dtype (verl/utils/experimental/torch_functional.py), i.e. bf16 logits, and is
refused by :func:`verl_opd.config.opd_config.apply_opd_settings` under ``opd.precision=bf16``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import TrainingWorker

logger = logging.getLogger(__name__)


def fp32_linear(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` as an fp32 matmul, whatever autocast or FSDP's parameter dtype say.

    Autocast would cast fp32 operands of ``F.linear`` back to bf16, so it is disabled here.
    Under FSDP's bf16 parameter dtype ``head.weight`` is the bf16 unsharded copy: its fp32
    upcast is exact, and the products of bf16 values are exact in fp32 (8 + 8 significand
    bits), so the only rounding left is fp32 accumulation.
    """
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head.weight.float(), bias)


def find_causal_lm(module: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside an engine's module (FSDP1 wraps it; FSDP2 shards it in place)."""
    for candidate in module.modules():
        if isinstance(candidate, PreTrainedModel) and candidate.get_output_embeddings() is not None:
            return candidate
    raise TypeError(
        f"verl-opd: no Hugging Face causal LM with an output embedding inside {type(module).__name__}; "
        "the fp32 LM head (opd.precision) needs one. Use an AutoModelForCausalLM checkpoint as the model path."
    )


def install_fp32_head(module: torch.nn.Module) -> torch.nn.Linear:
    """Make the output embedding of the model in ``module`` compute fp32 logits; return that head."""
    head = find_causal_lm(module).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"verl-opd: the output embedding is a {type(head).__name__}, not an nn.Linear; the fp32 LM head "
            "(opd.precision) only knows nn.Linear heads."
        )
    head.forward = functools.partial(fp32_linear, head)
    return head


class FP32HeadWorker(TrainingWorker):
    """verl's ``TrainingWorker`` whose model computes its logits with :func:`fp32_linear`.

    verl builds (and on ``reset`` rebuilds) the engine's module in ``engine.initialize()``,
    called from ``reset`` (verl/workers/engine_workers.py:172-179), which
    ``ActorRolloutRefWorker.init_model`` calls right after constructing its actor and ref
    workers (engine_workers.py:587-588, :644-645): the head is installed there.
    """

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def reset(self) -> None:
        super().reset()
        install_fp32_head(self.engine.module)
        logger.info("verl-opd: fp32 LM head installed (%s)", type(self).__name__)
