"""The boundary-lookahead potentials of ``opd.teacher.shaping``, read from verl's own forward.

A chunk's potential (:mod:`verl_opd.core.xtok_shaping`) needs a model's whole next-token distribution at the
chunk's last token, where verl's forward returns only the sampled token's log-prob. verl's FSDP engine has a
per-token logits hook: with the micro-batch flag ``distillation_use_topk`` it calls the worker's loss function
as ``loss_fn(student_logits=(1, N, V), data=micro_batch)`` on the temperature-scaled logits of every packed
token and stores each ``(1, N)`` tensor it returns as a jagged model output next to ``log_probs``
(verl/workers/engine/fsdp/transformer_impl.py:1412-1421 with ``use_remove_padding``, :1511-1519 without).
The loss function is then called once more as ``loss_fn(model_output=..., data=..., dp_group=...)``
(:1575-1578). :class:`ExtensionMassHook` is such a loss function: on the logits it returns, per position, the
log of the probability mass on the vocabulary entries whose bytes extend the next token's
(:func:`~verl_opd.core.xtok_shaping.extension_log_mass`), aligned like verl's ``log_probs`` (position p holds
the value for token p + 1); the potential is that minus the token's log-prob.

:func:`extension_pass` runs one ``TrainingWorker.infer_batch`` with the hook: the teacher's (its usual forward,
which also returns the log-probs) and, with ``shaping=both``, the student's actor on the student's batch (one
more forward per step). The hook needs every position's logits, so the driver refuses Ulysses sequence parallelism
(each rank then sees one shard of a sequence, and :1412 passes the shard) and the fused LM head (it never
materialises logits; the hook is not called, :1363-1380).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
import verl.utils.tensordict_utils as tu
from tensordict import TensorDict

from verl_opd.core.xtok_shaping import (
    EXTENSION_ROWS_PER_BLOCK,
    ExtensionTable,
    extension_log_mass,
    extension_table,
)

# The jagged model output the hook adds (aligned like verl's ``log_probs``).
EXTENSION_FIELD = "xtok_extension_log_mass"


class ExtensionMassHook:
    """verl's per-token logits hook returning :data:`EXTENSION_FIELD` for a vocabulary's byte table.

    The model's vocabulary may be larger than its tokenizer's (embedding rows padded for the hardware): the
    padded ids get no bytes and are treated as special (they extend only themselves), so the table matches
    the logits' width, built once per width.
    """

    def __init__(self, table: Sequence[bytes], special_ids: Collection[int]) -> None:
        self.table = list(table)
        self.special_ids = frozenset(int(i) for i in special_ids) | {i for i, b in enumerate(self.table) if not b}
        self._tables: dict[tuple[int, torch.device], ExtensionTable] = {}

    def extension_table(self, width: int, device: torch.device) -> ExtensionTable:
        """The extension table of a ``width``-entry vocabulary (the tokenizer's, padded with special ids), as
        tensors on ``device``: built and moved once, not at every block of every forward."""
        if width < len(self.table):
            raise ValueError(
                f"the model's logits have {width} entries but its tokenizer {len(self.table)} ids: the teacher "
                "view's tokenizer is not this model's."
            )
        if (width, device) not in self._tables:
            padded = self.table + [b""] * (width - len(self.table))
            table = extension_table(padded, self.special_ids | set(range(len(self.table), width)))
            self._tables[width, device] = table.to(device)
        return self._tables[width, device]

    def __call__(
        self,
        student_logits: torch.Tensor | None = None,
        data: TensorDict | None = None,
        model_output: dict[str, Any] | None = None,
        dp_group: Any = None,  # noqa: ANN401 - verl's process group, unused
    ) -> dict[str, torch.Tensor] | tuple[torch.Tensor, dict[str, Any]]:
        """The hook (``student_logits`` given: the logits of every packed token) or the loss call (no loss)."""
        if student_logits is None:
            return torch.zeros((), device=next(iter(model_output.values())).device), {}
        logits = student_logits.squeeze(0)
        # verl's labels: the packed ids rolled left by one (transformer_impl.py:1201, :1283); a sequence's last
        # position reads the next sequence's first id, and verl's log-prob there is dropped in the same way.
        labels = torch.roll(data["input_ids"].values().to(logits.device), shifts=-1)
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"verl passed {logits.shape[0]} rows of logits for {labels.shape[0]} packed tokens: the shaping "
                "hook needs every position's logits (no sequence parallelism, no padding to a fixed length)."
            )
        table = self.extension_table(logits.shape[1], logits.device)
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for start in range(0, logits.shape[0], EXTENSION_ROWS_PER_BLOCK):
                block = slice(start, start + EXTENSION_ROWS_PER_BLOCK)
                log_probs = torch.log_softmax(logits[block].float(), dim=-1)
                out[block] = extension_log_mass(log_probs, labels[block], table)
        return {EXTENSION_FIELD: out.unsqueeze(0)}


@contextlib.contextmanager
def extension_pass(worker: Any, hook: ExtensionMassHook, batch: TensorDict) -> Iterator[TensorDict]:  # noqa: ANN401
    """Within the block, ``worker.infer_batch(batch)`` also returns :data:`EXTENSION_FIELD`.

    verl's ``TrainingWorker.infer_batch`` hands the engine ``self.loss_fn`` when the batch's ``compute_loss``
    is true (verl/workers/engine_workers.py:401, :419), and the engine calls it as the logits hook when
    ``distillation_use_topk`` is (transformer_impl.py:1340, :1412). The worker's own loss function (the
    actor's PPO loss) is restored on exit. ``batch`` is flagged in place.
    """
    saved = getattr(worker, "loss_fn", None)
    tu.assign_non_tensor(batch, compute_loss=True, distillation_use_topk=True, calculate_entropy=False)
    worker.loss_fn = hook
    try:
        yield batch
    finally:
        worker.loss_fn = saved
