"""Per-GPU memory of a colocated OPD run from the models' ``config.json`` and the run's keys: arithmetic only.

verl's hybrid engine puts everything on the same GPUs and runs it in turns. One step is:
generation (vLLM awake, serving the student), then the student's log-prob pass, the
teacher's log-prob pass and the actor update (vLLM asleep). :func:`plan_memory` returns
each phase's bytes per GPU, component by component, and the host memory the offloads use.

What verl 0.9.1 does, as modelled here (paths inside the ``verl`` package):

* **Student (FSDP2 actor)**: loaded in ``actor.fsdp_config.model_dtype``, fp32 by default
  (trainer/config/engine/fsdp.yaml:33, workers/engine/fsdp/transformer_impl.py:258-264), then
  sharded over every GPU (``fully_shard`` per decoder layer, embedding and LM head,
  utils/fsdp_utils.py:549-600). The fp32 shards are the master weights; the forward/backward
  all-gathers one unit at a time in the compute dtype (``MixedPrecisionPolicy(param_dtype)``,
  transformer_impl.py:455-457) and reduce-scatters gradients in fp32 (``reduce_dtype``). AdamW
  keeps two fp32 moments per trainable parameter, allocated at the first step and kept after.
  Gradients are freed by ``zero_grad`` when the update ends (transformer_impl.py:1138-1139).
* **Offload keys**: ``actor.fsdp_config.param_offload`` / ``optimizer_offload`` move params /
  optimizer state to host memory outside the passes that need them (workers/engine/base.py:314-328);
  after a weight sync the params leave the GPU for the rollout (workers/engine_workers.py:810-812).
* **Teacher (ref slot)**: ``opd.teacher.offload=True`` is verl's forward-only engine, whose shards
  sit in pinned host memory and are streamed per unit (``CPUOffloadPolicy(pin_memory=True)``,
  transformer_impl.py:459-463). ``False`` (verl-opd's :class:`~verl_opd.glue.teacher_worker.TeacherWorker`)
  keeps them resident on every GPU in every phase, stored in ``opd.teacher.dtype``.
* **vLLM**: ``gpu_memory_utilization`` is the fraction of the GPU's TOTAL memory one vLLM
  instance may hold: its weights, activations and KV cache (vllm/v1/worker/gpu_worker.py,
  ``requested_memory``); at start it refuses to run if less than that is free
  (verl passes the key unchanged: workers/rollout/vllm_rollout/vllm_async_server.py:340).
  With ``rollout.free_cache_engine=True`` (default) vLLM sleeps at level 2 while the trainer
  works, releasing its weights and KV cache (vllm_async_server.py:853-860, :1289-1317), and
  wakes up with the same KV-cache size at every generation (engine_workers.py:772-823). The
  trainer's resident state is then on the same GPU: after the first update it includes the
  Adam moments, which were not there when vLLM sized itself at start-up.
* **Logits**: OPD's LM heads compute fp32 logits (``opd.precision``, :mod:`verl_opd.glue.precision`):
  tokens per micro-batch x vocabulary x 4 bytes per copy, plus an fp32 copy of the head's
  weight when the body computes in bf16. The student's log-prob pass also computes the entropy
  (trainer/ppo/v1/trainer_base.py:1653), the teacher's does not (:1699); the update computes it
  when ``actor.entropy_coeff != 0`` or ``actor.calculate_entropy`` (:1831-1833).
* **Shaping** (``opd.teacher.view=own`` with ``opd.teacher.shaping`` on): the extension-mass temporaries of
  :mod:`verl_opd.glue.shaping` next to the teacher's logits, and with ``both`` one more phase, the student's
  forward inside the teacher's pass on the teacher's token budget.

Not modelled (``RESERVE_GIB`` covers them as a round allowance): CUDA contexts of the trainer
and vLLM worker processes, NCCL buffers, vLLM's CUDA-graph pool (kept while it sleeps) and
activations, allocator fragmentation, the one-off host copies made while loading.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from verl_opd.core.xtok_shaping import EXTENSION_BUFFERS, EXTENSION_ROWS_PER_BLOCK

GIB = 1024**3
# Per GPU, for what is not modelled (module docstring): a round allowance, not a measurement.
RESERVE_GIB = 3.0
# A phase above this share of the usable memory is a WARN: the activation and logits terms are estimates.
WARN_FRACTION = 0.9
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Dense decoders whose parameter layout this module knows: q/k/v/o attention, SwiGLU MLP, RMSNorm.
QKV_BIAS_TYPES = {"qwen2"}  # Qwen2 has q/k/v biases without an ``attention_bias`` key
QK_NORM_TYPES = {"qwen3"}  # per-head RMSNorm on queries and keys
KNOWN_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# verl's ``target_modules: all-linear`` (trainer/config/model/hf_model.yaml:49) on such a decoder.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MemoryPlanError(ValueError):
    """A model or run the plan cannot describe; the message names what and where."""


def dtype_bytes(name: str, key: str) -> int:
    """Bytes per element of the dtype ``name`` that config key ``key`` gives."""
    try:
        return DTYPE_BYTES[str(name)]
    except KeyError:
        raise MemoryPlanError(f"{key}={name!r}: not a dtype the memory plan knows ({sorted(DTYPE_BYTES)})") from None


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a dense decoder-only LM depends on, read from its ``config.json``."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str) -> ModelShape:
        """Read a ``config.json`` mapping (multimodal configs: its ``text_config``); refuse MoE models."""
        from verl_opd.checks.teacher_fit import _text_config

        text = _text_config(config)
        moe = [key for key in MOE_KEYS if text.get(key)]
        if moe:
            raise MemoryPlanError(
                f"{name}: a mixture-of-experts model ({', '.join(f'{k}={text[k]}' for k in moe)} in config.json); "
                "the memory plan counts dense decoders only (Llama/Mistral/Qwen2/Qwen3 layout). Skip it with "
                "--skip plan."
            )
        missing = [
            k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in text
        ]
        if missing:
            raise MemoryPlanError(f"{name}: config.json has no {missing}; cannot count its parameters.")
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        model_type = str(text.get("model_type", "unknown"))
        return cls(
            name=name,
            model_type=model_type,
            vocab_size=int(text["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(text["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=bool(text.get("attention_bias", model_type in QKV_BIAS_TYPES)),
            qk_norm=model_type in QK_NORM_TYPES,
        )

    @classmethod
    def from_path(cls, path: str) -> ModelShape:
        """The shape of the model saved in directory ``path``."""
        config_file = os.path.join(path, "config.json")
        try:
            with open(config_file) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise MemoryPlanError(f"cannot read {config_file}: {exc}") from None
        return cls.from_config(config, name=os.path.basename(os.path.normpath(path)))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` features of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_parameters(self) -> int:
        """One decoder layer: the linears, q/k/v biases if any, two RMSNorms (+ q/k norms for Qwen3)."""
        linears = sum(n_in * n_out for n_in, n_out in self.linear_shapes().values())
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return linears + bias + norms

    def embedding_parameters(self) -> int:
        """Input embedding, plus the LM head unless tied to it."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def parameters(self) -> int:
        """All parameters (tied embeddings once), the final norm included."""
        return self.num_layers * self.layer_parameters() + self.embedding_parameters() + self.hidden_size

    def largest_fsdp_unit(self) -> int:
        """Parameters of the largest unit FSDP2 gathers at once: a decoder layer, the embedding or the LM head."""
        return max(self.layer_parameters(), self.vocab_size * self.hidden_size)

    def lora_parameters(self, rank: int, target_modules: str | list[str] | tuple[str, ...]) -> int:
        """LoRA adapter parameters, ``rank * (in + out)`` per targeted linear of every layer."""
        targets = ALL_LINEAR if target_modules == "all-linear" else tuple(target_modules)
        unknown = sorted(set(targets) - set(ALL_LINEAR))
        if unknown:
            raise MemoryPlanError(
                f"actor_rollout_ref.model.target_modules has {unknown}; the memory plan knows {list(ALL_LINEAR)} "
                "or all-linear."
            )
        shapes = self.linear_shapes()
        return self.num_layers * sum(rank * sum(shapes[name]) for name in targets)

    def layer_activation_values(self) -> int:
        """Values per token one decoder layer keeps for its backward (estimate).

        Norm inputs/outputs and the residual (6 x hidden), q/k/v before and after RoPE plus the
        attention output (3 x q + 3 x kv; FlashAttention keeps no score matrix), and the SwiGLU
        MLP's gate, up, activation and product (4 x intermediate).
        """
        return 6 * self.hidden_size + 3 * self.q_dim + 3 * self.kv_dim + 4 * self.intermediate_size

    def kv_cache_bytes_per_token(self, tp: int, dtype: int) -> int:
        """vLLM KV-cache bytes per token on one GPU: K and V of every layer, KV heads split over TP (or replicated)."""
        kv_heads = max(1, self.num_kv_heads // tp)
        return 2 * self.num_layers * kv_heads * self.head_dim * dtype


@dataclass(frozen=True)
class TokenBudget:
    """Tokens one micro-batch holds on one GPU, and the key that bounds them."""

    tokens: int
    key: str


@dataclass(frozen=True)
class StudentRun:
    """How the student is trained: storage, compute, offloads, token budgets, LoRA."""

    shape: ModelShape
    storage_bytes: int  # actor.fsdp_config.model_dtype
    train_budget: TokenBudget
    log_prob_budget: TokenBudget
    param_offload: bool = False
    optimizer_offload: bool = False
    gradient_checkpointing: bool = True
    update_entropy: bool = False
    lora_rank: int = 0
    lora_target_modules: str | tuple[str, ...] = "all-linear"

    def trainable_parameters(self) -> int:
        """What has gradients and Adam moments: the adapters with LoRA, else every parameter."""
        if self.lora_rank > 0:
            return self.shape.lora_parameters(self.lora_rank, self.lora_target_modules)
        return self.shape.parameters()


@dataclass(frozen=True)
class TeacherRun:
    """One teacher in the ref slot: its storage dtype, whether it is offloaded, its token budget."""

    shape: ModelShape
    storage_bytes: int  # opd.teacher.dtype
    offload: bool
    log_prob_budget: TokenBudget
    shaping: str = "none"  # opd.teacher.shaping, resolved (view=own): none | teacher | both


@dataclass(frozen=True)
class RolloutRun:
    """The colocated vLLM rollout."""

    tensor_parallel: int
    gpu_memory_utilization: float
    dtype_bytes: int = 2  # rollout.dtype (bfloat16 by default)
    free_cache_engine: bool = True


@dataclass(frozen=True)
class Cluster:
    n_gpus_per_node: int
    nnodes: int
    gpu_memory_gib: float

    @property
    def world_size(self) -> int:
        return self.n_gpus_per_node * self.nnodes

    @property
    def gpu_bytes(self) -> float:
        return self.gpu_memory_gib * GIB

    @property
    def usable_bytes(self) -> float:
        return self.gpu_bytes - RESERVE_GIB * GIB


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan reads; ``teachers`` is a tuple so several teachers are each counted."""

    cluster: Cluster
    student: StudentRun
    teachers: tuple[TeacherRun, ...]
    rollout: RolloutRun
    compute_bytes: int  # opd.precision: 2 (bf16 body) or 4 (fp32)


@dataclass(frozen=True)
class Component:
    """One line of a phase: bytes per GPU and how they were counted."""

    name: str
    bytes: float
    how: str


@dataclass(frozen=True)
class Phase:
    name: str
    components: tuple[Component, ...]

    @property
    def total(self) -> float:
        return sum(c.bytes for c in self.components)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of each phase, host bytes per node, and the vLLM share that still fits."""

    inputs: PlanInputs
    phases: tuple[Phase, ...]
    host: tuple[Component, ...]
    vllm_weights: float
    kv_bytes_per_token: int
    max_gpu_memory_utilization: float
    notes: tuple[str, ...] = field(default=())

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


GENERATION, STUDENT_LOG_PROB, TEACHER_LOG_PROB, UPDATE = "generation", "student log-prob", "teacher log-prob", "update"


def _logits(who: str, tokens: TokenBudget, vocab: int, copies: int, what: str) -> Component:
    return Component(
        f"{who} logits (fp32)",
        copies * tokens.tokens * vocab * 4,
        f"{tokens.tokens} tokens ({tokens.key}) x vocab {vocab} x 4 B x {copies} ({what})",
    )


def _fp32_head(who: str, shape: ModelShape, compute_bytes: int, copies: int) -> list[Component]:
    """The fp32 upcast of the gathered LM head weight (and its gradient in the update); none in fp32 compute."""
    if compute_bytes >= 4:
        return []
    size = shape.vocab_size * shape.hidden_size * 4
    return [Component(f"{who} LM head in fp32", copies * size, f"vocab x hidden x 4 B x {copies} (opd.precision=bf16)")]


def _shaping_buffers(who: str, vocab: int) -> Component:
    """The extension-mass temporaries of ``opd.teacher.shaping`` (:mod:`verl_opd.glue.shaping`), next to the logits."""
    size = EXTENSION_ROWS_PER_BLOCK * vocab * 4 * EXTENSION_BUFFERS
    return Component(
        f"{who} shaping buffers",
        size,
        f"{EXTENSION_ROWS_PER_BLOCK} positions x vocab {vocab} x 4 B x {EXTENSION_BUFFERS} (opd.teacher.shaping)",
    )


def _forward_activations(who: str, shape: ModelShape, tokens: TokenBudget, compute_bytes: int) -> Component:
    """A forward without grad keeps no layer's values once the next starts: one layer's, an upper estimate."""
    return Component(
        f"{who} activations",
        tokens.tokens * shape.layer_activation_values() * compute_bytes,
        "tokens x one layer's values (no grad; upper estimate)",
    )


def _gathered(shape: ModelShape, compute_bytes: int, label: str) -> Component:
    """FSDP2's unsharded working set: the unit in use and the next one (prefetch / backward neighbour)."""
    return Component(
        f"{label} gathered units",
        2 * shape.largest_fsdp_unit() * compute_bytes,
        "2 x largest FSDP unit x compute bytes",
    )


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """Bytes per GPU in each phase (see the module docstring for what is modelled and where verl does it)."""
    cluster, student, rollout, c = inputs.cluster, inputs.student, inputs.rollout, inputs.compute_bytes
    if cluster.usable_bytes <= 0:
        raise MemoryPlanError(
            f"--gpu-memory-gib={cluster.gpu_memory_gib:g} leaves nothing after the {RESERVE_GIB:g} GiB reserve; "
            "pass the memory of one GPU in GiB (nvidia-smi's MiB / 1024)."
        )
    n = cluster.world_size
    s = student.shape
    params = s.parameters()
    trainable = student.trainable_parameters()
    lora = student.lora_rank > 0

    master = Component(
        "student params",
        params * student.storage_bytes / n,
        f"{params / 1e9:.2f}B x {student.storage_bytes} B / {n} GPUs (FSDP shards)",
    )
    adam = Component(
        "student Adam moments",
        trainable * 8 / n,
        f"{trainable / 1e9:.3g}B {'adapter' if lora else 'trainable'} x 2 x fp32 / {n} GPUs",
    )
    grads = Component("student grads", trainable * 4 / n, f"{trainable / 1e9:.3g}B x fp32 / {n} GPUs")

    resident_teachers, streamed, host = [], {}, []
    for t in inputs.teachers:
        shard = t.shape.parameters() * t.storage_bytes / n
        how = f"{t.shape.parameters() / 1e9:.2f}B x {t.storage_bytes} B / {n} GPUs"
        if t.offload:
            host.append(
                Component(f"teacher {t.shape.name} (pinned)", shard * cluster.n_gpus_per_node, how + " x GPUs per node")
            )
            streamed[t.shape.name] = _gathered(t.shape, c, f"teacher {t.shape.name}")
        else:
            resident_teachers.append(Component(f"teacher {t.shape.name}", shard, how))
    if student.param_offload:
        host.append(Component("student params", master.bytes * cluster.n_gpus_per_node, "param_offload"))
    if student.optimizer_offload:
        host.append(Component("student Adam moments", adam.bytes * cluster.n_gpus_per_node, "optimizer_offload"))

    vllm_budget = rollout.gpu_memory_utilization * cluster.gpu_bytes
    vllm_weights = params * rollout.dtype_bytes / rollout.tensor_parallel
    asleep = (
        []
        if rollout.free_cache_engine
        else [Component("vLLM (awake: free_cache_engine=False)", vllm_budget, "gpu_memory_utilization x GPU memory")]
    )

    # Generation: vLLM awake next to what the trainer keeps.
    kept = [] if student.param_offload else [master]
    kept += [] if student.optimizer_offload else [adam]
    generation_resident = kept + resident_teachers
    kv_per_token = s.kv_cache_bytes_per_token(rollout.tensor_parallel, rollout.dtype_bytes)
    kv = max(0.0, vllm_budget - vllm_weights)
    generation = Phase(
        GENERATION,
        (
            *generation_resident,
            Component(
                "vLLM weights",
                vllm_weights,
                f"{params / 1e9:.2f}B x {rollout.dtype_bytes} B / TP {rollout.tensor_parallel}",
            ),
            Component(
                "vLLM KV cache + activations",
                kv,
                f"gpu_memory_utilization {rollout.gpu_memory_utilization} x GPU - weights "
                f"(~{kv / kv_per_token / 1e3:.0f}k tokens at {kv_per_token / 1024:.0f} KiB/token)",
            ),
        ),
    )

    # Trainer phases: vLLM asleep; params and (for the update) Adam on the GPU.
    training_resident = [master, *resident_teachers, *asleep]
    adam_in_passes = [] if student.optimizer_offload else [adam]
    lp = student.log_prob_budget
    student_lp = Phase(
        STUDENT_LOG_PROB,
        (
            *training_resident,
            *adam_in_passes,
            _gathered(s, c, "student"),
            _forward_activations("student", s, lp, c),
            _logits("student", lp, s.vocab_size, 2, "logits + softmax for the entropy"),
            *_fp32_head("student", s, c, 1),
        ),
    )
    teacher_passes = []
    for t in inputs.teachers:
        shape, budget, who = t.shape, t.log_prob_budget, f"teacher {t.shape.name}"
        teacher_passes.append(
            Phase(
                TEACHER_LOG_PROB if len(inputs.teachers) == 1 else f"{TEACHER_LOG_PROB} ({shape.name})",
                (
                    *training_resident,
                    *adam_in_passes,
                    *([streamed[shape.name]] if t.offload else [_gathered(shape, c, who)]),
                    _forward_activations(who, shape, budget, c),
                    _logits(who, budget, shape.vocab_size, 1, "no entropy"),
                    *_fp32_head(who, shape, c, 1),
                    *([_shaping_buffers(who, shape.vocab_size)] if t.shaping != "none" else []),
                ),
            )
        )
        if t.shaping == "both":
            # the student's potentials: one more student forward in the teacher's pass, on the teacher's budget
            teacher_passes.append(
                Phase(
                    f"{TEACHER_LOG_PROB} (student potentials)",
                    (
                        *training_resident,
                        *adam_in_passes,
                        _gathered(s, c, "student"),
                        _forward_activations("student", s, budget, c),
                        _logits("student", budget, s.vocab_size, 1, "no entropy"),
                        *_fp32_head("student", s, c, 1),
                        _shaping_buffers("student", s.vocab_size),
                    ),
                )
            )
    tb = student.train_budget
    values = s.layer_activation_values()
    if student.gradient_checkpointing:
        acts = Component(
            "student activations",
            tb.tokens * (s.hidden_size * s.num_layers + 2 * values) * c,
            "tokens x (hidden x layers + 2 x one layer's values) x compute bytes (checkpointed; estimate)",
        )
    else:
        acts = Component(
            "student activations",
            tb.tokens * (values * s.num_layers + values) * c,
            "tokens x one layer's values x (layers + 1) x compute bytes (no checkpointing; estimate)",
        )
    update = Phase(
        UPDATE,
        (
            *training_resident,
            adam,
            grads,
            _gathered(s, c, "student"),
            Component(
                "student unit gradient (fp32)",
                s.largest_fsdp_unit() * 4,
                "one unsharded unit's gradient before reduce-scatter",
            ),
            acts,
            _logits("student", tb, s.vocab_size, 3 if student.update_entropy else 2, "logits + gradient [+ entropy]"),
            *_fp32_head("student", s, c, 2),
        ),
    )

    resident_generation_bytes = sum(comp.bytes for comp in generation_resident)
    free_for_vllm = cluster.usable_bytes - resident_generation_bytes
    max_util = math.floor(100 * free_for_vllm / cluster.gpu_bytes) / 100
    return MemoryPlan(
        inputs=inputs,
        phases=(generation, student_lp, *teacher_passes, update),
        host=tuple(host),
        vllm_weights=vllm_weights,
        kv_bytes_per_token=kv_per_token,
        max_gpu_memory_utilization=max_util,
        notes=()
        if s.model_type in KNOWN_TYPES
        else (f"{s.name}: model_type {s.model_type!r} counted as a Llama-style decoder",),
    )


@dataclass(frozen=True)
class Verdict:
    """``PASS``, ``WARN`` or ``FAIL``, and why."""

    status: str
    reason: str


def judge(plan: MemoryPlan) -> dict[str, Verdict]:
    """``PASS``/``WARN``/``FAIL`` per phase; generation's says whether vLLM's share fits beside the trainer."""
    usable = plan.inputs.cluster.usable_bytes
    verdicts = {}
    for phase in plan.phases:
        share = phase.total / usable
        text = f"{phase.total / GIB:.1f} of {usable / GIB:.1f} GiB usable per GPU"
        if share > 1:
            verdicts[phase.name] = Verdict("FAIL", f"{text}: does not fit")
        elif share > WARN_FRACTION:
            verdicts[phase.name] = Verdict("WARN", f"{text}: within {1 - WARN_FRACTION:.0%} of the limit (an estimate)")
        else:
            verdicts[phase.name] = Verdict("PASS", text)
    verdicts[GENERATION] = _judge_generation(plan)
    return verdicts


def _judge_generation(plan: MemoryPlan) -> Verdict:
    """vLLM's share (a hard budget it never exceeds) against what the trainer keeps on the GPU while it runs."""
    util, best = plan.inputs.rollout.gpu_memory_utilization, plan.max_gpu_memory_utilization
    key = "actor_rollout_ref.rollout.gpu_memory_utilization"
    gpu = plan.inputs.cluster.gpu_bytes
    total = plan.phase(GENERATION).total
    text = f"{total / GIB:.1f} of {plan.inputs.cluster.usable_bytes / GIB:.1f} GiB usable per GPU"
    weights = plan.vllm_weights / GIB
    if best * gpu <= plan.vllm_weights:
        return Verdict(
            "FAIL",
            f"{text}; no room for vLLM: its weights need {weights:.1f} GiB per GPU but at most {key}={best:.2f} fits "
            "beside what the trainer keeps; offload the teacher (opd.teacher.offload=True) or the student's optimizer "
            "(actor_rollout_ref.actor.fsdp_config.optimizer_offload=True), or raise "
            "actor_rollout_ref.rollout.tensor_model_parallel_size",
        )
    if util * gpu <= plan.vllm_weights:
        return Verdict(
            "FAIL",
            f"{key}={util} gives vLLM {util * gpu / GIB:.1f} GiB per GPU, not more than its weights ({weights:.1f} "
            f"GiB): no KV cache; raise it (at most {best:.2f} fits)",
        )
    if util > best:
        return Verdict(
            "FAIL",
            f"{text}: {key}={util} asks {util * gpu / GIB:.1f} GiB per GPU but only {best:.2f} fits beside what the "
            f"trainer keeps during generation (its Adam moments exist from the first update on, so vLLM's wake-up at "
            f"step 2 would run out of memory): set {key}={best:.2f} or lower",
        )
    kv_tokens = (util * gpu - plan.vllm_weights) / plan.kv_bytes_per_token
    return Verdict(
        "PASS",
        f"{text}; {key}={util} fits, the highest that fits is {best:.2f} (KV cache + vLLM activations "
        f"{(util * gpu - plan.vllm_weights) / GIB:.1f} GiB per GPU, at most ~{kv_tokens / 1e3:.0f}k tokens per vLLM "
        "replica)",
    )


def _budget(
    arr: Any, seq_len: int, sp: int, dynamic_key: str, tokens_key: str, micro_keys: tuple[str, ...]
) -> TokenBudget:
    """Tokens per micro-batch per GPU: the token budget with dynamic batch size, else micro-batch x sequence length.

    verl packs dynamic micro-batches up to ``budget x sp`` tokens and splits them over the ``sp``
    Ulysses ranks (verl/workers/engine/utils.py:111): ``budget`` per GPU either way.
    """
    from omegaconf import OmegaConf

    prefix = "actor_rollout_ref."
    if OmegaConf.select(arr, dynamic_key, default=False):
        tokens = OmegaConf.select(arr, tokens_key)
        if tokens is None:
            raise MemoryPlanError(f"{prefix}{dynamic_key}=True but {prefix}{tokens_key} is unset.")
        return TokenBudget(int(tokens), prefix + tokens_key)
    for key in micro_keys:
        micro = OmegaConf.select(arr, key)
        if micro is not None:
            return TokenBudget(math.ceil(int(micro) * seq_len / sp), f"{prefix}{key} x (prompt + response)")
    raise MemoryPlanError(
        f"no micro-batch size to plan with: set {prefix}{micro_keys[0]}, or {prefix}{dynamic_key}=True with "
        f"{prefix}{tokens_key}."
    )


def inputs_from_config(config: Any, gpu_memory_gib: float) -> PlanInputs:
    """:class:`PlanInputs` from a composed verl config (before verl-opd's driver hook: it reads ``opd.*`` itself).

    The student is ``actor_rollout_ref.model.path``, the teacher ``opd.teacher.model_path`` or every
    ``opd.teachers.<name>.model_path`` (each counted, resident or offloaded); only their ``config.json``
    files are read.
    """
    from omegaconf import OmegaConf

    from verl_opd.config.opd_config import OPDConfig, resolve_precision, resolve_shaping

    arr = config.actor_rollout_ref
    opd = OPDConfig.from_config(config)
    if not all(teacher.model_path for _, _, teacher in opd.teacher_list()):
        raise MemoryPlanError(
            "no teacher to plan for: pass --teacher PATH (opd.teacher.model_path), or give every "
            "opd.teachers.<name>.model_path."
        )
    precision = resolve_precision(config, opd)
    shaping, _ = resolve_shaping(config, opd)  # only a single teacher reads its own view
    seq_len = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    sp = int(OmegaConf.select(arr, "actor.ulysses_sequence_parallel_size", default=1) or 1)
    lora = OmegaConf.select(arr, "model.lora_rank", default=0) or 0
    targets = OmegaConf.select(arr, "model.target_modules", default="all-linear")
    student = StudentRun(
        shape=ModelShape.from_path(arr.model.path),
        storage_bytes=dtype_bytes(arr.actor.fsdp_config.model_dtype, "actor_rollout_ref.actor.fsdp_config.model_dtype"),
        train_budget=_budget(
            arr,
            seq_len,
            sp,
            "actor.use_dynamic_bsz",
            "actor.ppo_max_token_len_per_gpu",
            ("actor.ppo_micro_batch_size_per_gpu",),
        ),
        log_prob_budget=_budget(
            arr,
            seq_len,
            sp,
            "rollout.log_prob_use_dynamic_bsz",
            "rollout.log_prob_max_token_len_per_gpu",
            ("rollout.log_prob_micro_batch_size_per_gpu",),
        ),
        param_offload=bool(arr.actor.fsdp_config.param_offload),
        optimizer_offload=bool(arr.actor.fsdp_config.optimizer_offload),
        gradient_checkpointing=bool(arr.model.get("enable_gradient_checkpointing", False)),
        update_entropy=bool(arr.actor.get("calculate_entropy", False)) or arr.actor.get("entropy_coeff", 0) != 0,
        lora_rank=int(lora),
        lora_target_modules=targets if isinstance(targets, str) else tuple(targets),
    )
    # verl-opd defaults the teachers' micro-batch to the rollout's, then the actor's (opd_config._opd_rules);
    # every teacher of the ref slot shares the ref's micro-batch settings.
    teacher_budget = _budget(
        arr,
        seq_len,
        sp,
        "ref.log_prob_use_dynamic_bsz",
        "ref.log_prob_max_token_len_per_gpu",
        (
            "ref.log_prob_micro_batch_size_per_gpu",
            "rollout.log_prob_micro_batch_size_per_gpu",
            "actor.ppo_micro_batch_size_per_gpu",
        ),
    )
    teachers = tuple(
        TeacherRun(
            shape=ModelShape.from_path(teacher.model_path),
            storage_bytes=dtype_bytes(teacher.dtype, f"{key}.dtype"),
            offload=teacher.offload,
            log_prob_budget=teacher_budget,
            shaping=shaping,
        )
        for _, key, teacher in opd.teacher_list()
    )
    rollout = RolloutRun(
        tensor_parallel=int(arr.rollout.tensor_model_parallel_size),
        gpu_memory_utilization=float(arr.rollout.gpu_memory_utilization),
        dtype_bytes=dtype_bytes(arr.rollout.dtype, "actor_rollout_ref.rollout.dtype"),
        free_cache_engine=bool(arr.rollout.free_cache_engine),
    )
    cluster = Cluster(int(config.trainer.n_gpus_per_node), int(config.trainer.nnodes), float(gpu_memory_gib))
    return PlanInputs(cluster, student, teachers, rollout, DTYPE_BYTES[precision])
