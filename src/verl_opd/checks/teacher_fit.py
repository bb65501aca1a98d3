"""Driver-side checks that the teacher can score what the run gives it, read from its ``config.json`` alone.

Both mistakes would otherwise surface late or not at all: a teacher whose positions end
before prompt + response scores the tail of every long sample out of its range (wrong
log-probs, so wrong advantages, and no error), and a sequence-parallel size that does not
split the teacher's attention heads fails as an assertion inside verl's model patching
while the ref engine is built on every worker, after the GPUs are allocated.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_opd.config.opd_config import REF_SP_KEYS, OPDConfigError

logger = logging.getLogger(__name__)

PROMPT_KEY = "data.max_prompt_length"
RESPONSE_KEY = "data.max_response_length"
REF_SP_KEY, REF_ENGINE_SP_KEY = REF_SP_KEYS


def check_teacher_fits(config: DictConfig, teacher_path: str) -> None:
    """Refuse a run whose sequences exceed the teacher's context, or whose ref SP size cannot split its heads."""
    with open(os.path.join(teacher_path, "config.json")) as f:
        text = _text_config(json.load(f))
    _check_context(config, teacher_path, text)
    _check_sequence_parallel(config, teacher_path, text)


def _text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a ``config.json``.

    Multimodal configs nest it under ``text_config``; verl reads the heads the same way
    (verl/models/transformers/monkey_patch.py:333-341).
    """
    return hf_config if "num_attention_heads" in hf_config else hf_config.get("text_config", hf_config)


def teacher_context_length(text: dict[str, Any]) -> int | None:
    """The longest sequence the teacher's positions cover, or ``None`` when its config does not say.

    ``max_position_embeddings``, extended by a RoPE scaling factor when there is one
    (``rope_scaling``, or ``rope_parameters`` as transformers 5 saves it). Configs disagree on
    whether ``max_position_embeddings`` already includes the factor (Llama 3.1 raises it and
    keeps ``original_max_position_embeddings``; Qwen's YaRN recipe leaves it at the original
    length), so the larger of both readings is taken: the check refuses only what no reading
    of the config allows.
    """
    max_positions = text.get("max_position_embeddings")
    if max_positions is None:
        return None
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    factor = rope.get("factor") or 1.0
    original = rope.get("original_max_position_embeddings") or max_positions
    return max(max_positions, int(factor * original))


def _check_context(config: DictConfig, teacher_path: str, text: dict[str, Any]) -> None:
    prompt, response = OmegaConf.select(config, PROMPT_KEY), OmegaConf.select(config, RESPONSE_KEY)
    context = teacher_context_length(text)
    if context is None:
        logger.warning(
            "verl-opd: %s/config.json has no max_position_embeddings; cannot check that the teacher's context "
            "holds %s + %s.",
            teacher_path,
            PROMPT_KEY,
            RESPONSE_KEY,
        )
        return
    if prompt + response > context:
        raise OPDConfigError(
            f"The teacher ({teacher_path}) covers {context} positions (config.json max_position_embeddings="
            f"{text['max_position_embeddings']}, RoPE scaling included), but it scores prompt and response as one "
            f"sequence of up to {PROMPT_KEY} + {RESPONSE_KEY} = {prompt} + {response} = {prompt + response} tokens. "
            f"Lower {PROMPT_KEY} / {RESPONSE_KEY} to a total of at most {context}, or use a teacher with a longer "
            "context."
        )


def _ref_sequence_parallel(config: DictConfig) -> tuple[str, int]:
    """The ref engine's Ulysses size and the key it comes from.

    ``FSDPActorConfig`` copies a top-level size > 1 into its engine config
    (verl/workers/config/actor.py:328-329), which is what the engine uses
    (verl/workers/engine/fsdp/transformer_impl.py:244). verl's ref config defaults the
    top-level key to the actor's (trainer/config/ref/dp_ref.yaml:39).
    """
    size = OmegaConf.select(config, REF_SP_KEY, default=1) or 1
    if size > 1:
        return REF_SP_KEY, size
    return REF_ENGINE_SP_KEY, OmegaConf.select(config, REF_ENGINE_SP_KEY, default=1) or 1


def _splits_heads(size: int, heads: int, kv_heads: int) -> bool:
    """verl's own condition for Ulysses attention (verl/models/transformers/monkey_patch.py:343-349)."""
    return heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def _check_sequence_parallel(config: DictConfig, teacher_path: str, text: dict[str, Any]) -> None:
    key, size = _ref_sequence_parallel(config)
    heads = text.get("num_attention_heads")
    if size == 1 or heads is None:
        return
    kv_heads = text.get("num_key_value_heads") or heads
    if not _splits_heads(size, heads, kv_heads):
        valid = [s for s in range(1, heads + 1) if _splits_heads(s, heads, kv_heads)]
        raise OPDConfigError(
            f"{key}={size} cannot split the teacher's attention heads ({teacher_path}: num_attention_heads={heads}, "
            f"num_key_value_heads={kv_heads}); verl's Ulysses attention needs num_attention_heads divisible by the "
            "size, and num_key_value_heads divisible by it or dividing it. "
            f"Set {key} to one of {valid}; the student's size (actor_rollout_ref.actor.*) is separate and can stay."
        )
