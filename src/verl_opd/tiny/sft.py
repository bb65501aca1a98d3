"""Plain-torch supervised fine-tuning on CPU, and sampling from a model for off-policy distillation data.

The demo needs a teacher and a student trained by this project's own code (no hub checkpoints). SFT here
trains on the chat-formatted prompt (rendered exactly as verl renders it: chat template with generation
prompt) followed by the completion and eos, with the loss on completion tokens only, which is the same
token layout verl's rollouts produce, so log-probs of the SFT models line up with verl's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from verl_opd.tiny.tokenizer import copy_tokenizer

Messages = list[dict[str, str]]
# A chat prompt (user messages) and the assistant completion to learn (without the eos token).
SFTExample = tuple[Messages, str]


@dataclass
class SFTResult:
    """Where the trained model was saved, its per-step training losses and the wall time it took."""

    path: Path
    losses: list[float]
    seconds: float


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The prompt text the policy sees: the chat template with the assistant generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_example(tokenizer: PreTrainedTokenizerBase, example: SFTExample) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + eos, and a loss mask that is 1 exactly on completion tokens and eos.

    Prompt and completion are tokenized separately, as verl does (the response is generated token by
    token after the prompt), so no BPE merge can straddle the boundary.
    """
    messages, completion = example
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``loss_mask`` tensors."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    loss_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        loss_mask[row, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def completion_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of ``batch`` (prompt and padding excluded)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum() / mask.sum()


def sft_train(
    model_dir: str | Path,
    out_dir: str | Path,
    train_examples: Sequence[SFTExample],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    log_every: int = 100,
) -> SFTResult:
    """Fine-tune the model in ``model_dir`` on ``train_examples``; save it and its tokenizer files to ``out_dir``.

    AdamW with linear warmup then cosine decay to 10% of ``lr``; batches are drawn uniformly with a seeded
    generator, so a run is reproducible on a given machine.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    encoded = [encode_example(tokenizer, example) for example in train_examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        loss = completion_loss(model, collate([encoded[i] for i in picks], tokenizer.pad_token_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            print(
                f"[sft {Path(out_dir).name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.1f}s)",
                flush=True,
            )
    out = Path(out_dir)
    model.save_pretrained(str(out))
    copy_tokenizer(model_dir, out)
    return SFTResult(path=out, losses=losses, seconds=time.perf_counter() - start)


@torch.no_grad()
def sample_completions(
    model_dir: str | Path,
    prompts: Sequence[Messages],
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 128,
    seed: int = 0,
) -> list[str]:
    """Generate one completion per chat prompt (greedy when ``temperature == 0``), special tokens stripped.

    Used both to grade models and to build off-policy distillation data (SFT on a teacher's own samples),
    the baseline OPD is compared against.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    completions: list[str] = []
    for begin in range(0, len(prompts), batch_size):
        texts = [render_prompt(tokenizer, messages) for messages in prompts[begin : begin + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return completions
