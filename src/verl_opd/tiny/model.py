"""A tiny, seeded, randomly initialised Qwen2 (or Llama) causal LM saved next to its tokenizer.

verl loads the actor, rollout and reference models from one ``model.path``; saving the weights and the
tokenizer in the same directory makes that single path sufficient, offline. Qwen2 is used because it is
an architecture verl supports natively (FSDP wrapping, log-prob computation, HF rollout). Llama is for a
teacher with :func:`verl_opd.tiny.tokenizer.build_other_tokenizer`'s tokenizer: in a ``qwen2`` directory
transformers would load any tokenizer as ``Qwen2Tokenizer``, which rebuilds Qwen2's split regex
(transformers/models/auto/tokenization_auto.py, ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), whereas a
``llama`` directory loads ``tokenizer.json`` as saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from verl_opd.tiny.tokenizer import copy_tokenizer

# ``architecture`` of build_model: its config and causal-LM classes (both take the same arguments here).
ARCHITECTURES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def model_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 8192,
    initializer_range: float = 0.02,
    architecture: str = "qwen2",
) -> Qwen2Config | LlamaConfig:
    """The config :func:`build_model` instantiates: vocabulary and special ids from ``tokenizer``.

    ``intermediate_size`` defaults to ``2 * hidden_size``. Like Qwen, the bos id is ``<|endoftext|>`` (the
    pad token) since the tokenizer has no bos. ``max_position_embeddings`` costs nothing (RoPE is computed
    per forward); its default covers the example configs' prompt + response (1024 + 4096), which verl-opd
    checks against the teacher's context. Separate from :func:`build_model` so a caller that must not
    allocate the weights (``benchmarks/gpu_smoke.py --dry-run``) describes exactly the same model.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture][0](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        initializer_range=initializer_range,
    )


def build_model(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 8192,
    initializer_range: float = 0.02,
    architecture: str = "qwen2",
) -> Path:
    """Build a seeded random causal LM, save it with ``tokenizer`` in ``out_dir`` and return the path.

    ``architecture`` is ``qwen2`` (``Qwen2ForCausalLM``) or ``llama`` (``LlamaForCausalLM``, for a tokenizer
    that is not Qwen2's: see the module docstring).

    The config is :func:`model_config`'s (hidden 64, 2 layers, vocab 512: about 107k parameters). A
    larger ``initializer_range`` gives a random model with sharper, more opinionated next-token
    distributions: a teacher that differs clearly from a near-uniform random student. ``tokenizer`` may be
    a directory: its files are then copied byte for byte (see :func:`verl_opd.tiny.tokenizer.copy_tokenizer`).
    """
    tokenizer_dir = None if isinstance(tokenizer, PreTrainedTokenizerBase) else Path(tokenizer)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        architecture=architecture,
    )
    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture][1](config)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    if tokenizer_dir is None:
        tokenizer.save_pretrained(str(out))
    else:
        copy_tokenizer(tokenizer_dir, out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
