"""``hf``: a rollout backend for verl built on Hugging Face ``generate``.

verl 0.9.1 only ships vLLM/SGLang/TensorRT-LLM servers, none of which run on a
CPU. This module provides the three pieces verl's agent loop expects from a
rollout backend, registered under ``actor_rollout_ref.rollout.name=hf``. It also
serves on a CUDA GPU (bf16 weights there), for a GPU machine without vLLM:

* :class:`HFGenerateServer`: a Ray actor that owns a copy of the model and answers
  token-in/token-out ``generate`` calls. Concurrent requests are gathered into
  micro-batches (left-padded) so a step's samples are generated together.
  It returns per-token log-probs of the distribution it sampled from
  (``log_softmax(logits / temperature)``), which is what verl's training engine
  recomputes as ``old_log_probs``, and vLLM-style ``prompt_logprobs`` so verl's
  own distillation teacher servers work on it too.
* :class:`HFReplica`: the :class:`~verl.workers.rollout.replica.RolloutReplica`
  that starts one server per replica (named like verl's own servers), on the GPU
  of the replica's first training worker when verl's platform is CUDA.
* :class:`HFServerAdapter`: lives in the training worker; receives the trained
  weights from verl's checkpoint engine and hands them to the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from verl_opd.cpu import ROLLOUT_NAME

logger = logging.getLogger(__name__)

_BATCH_WINDOW_S = 0.02


def server_actor_name(replica_rank: int, node_rank: int = 0, role: str = "") -> str:
    """Name of the Ray actor serving one replica; the adapter finds its server by it."""
    role_part = f"{role}_" if role else ""
    return f"{ROLLOUT_NAME}_server_{role_part}{replica_rank}_{node_rank}"


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    want_logprobs: bool
    future: asyncio.Future = field(repr=False)


def cuda_device(accelerator_id: str) -> torch.device:
    """The torch device of the GPU that Ray calls ``accelerator_id``, as seen by this process.

    Ray names GPUs by their entries in the node's ``CUDA_VISIBLE_DEVICES`` (all of the node's
    GPUs, by index, when it is unset), and leaves that variable as the node had it in an actor
    that holds no GPU (the server is started with Ray's ``NOSET`` variable, as verl's vLLM
    server is). The index is looked up instead of re-setting ``CUDA_VISIBLE_DEVICES`` (what verl's
    vLLM server does, vllm_async_server.py:135, for its engine *subprocesses*): this process may
    have initialised CUDA while importing verl, after which the variable is no longer read.
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return torch.device("cuda", int(accelerator_id))
    if accelerator_id not in visible:
        raise RuntimeError(
            f"hf rollout: the training worker's GPU {accelerator_id!r} is not in this process's "
            f"CUDA_VISIBLE_DEVICES={','.join(visible)}; start Ray with the same CUDA_VISIBLE_DEVICES for all processes."
        )
    return torch.device("cuda", visible.index(accelerator_id))


def _sampling_key(params: dict[str, Any]) -> tuple[float, float, int]:
    """Requests that share a key can be generated in one batch."""
    temperature = float(params.get("temperature", 1.0))
    top_p = float(params.get("top_p", 1.0))
    top_k = int(params.get("top_k", -1) or -1)
    return temperature, top_p, top_k


def prompt_logprobs(
    logits: torch.Tensor, ids: list[int], num_logprobs: int
) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM-layout prompt log-probs of a single sequence.

    Entry ``t`` (for ``t = 0 .. S-2``) holds the log-prob of token ``t + 1`` under the
    model's distribution at position ``t`` (or its top-``num_logprobs`` entries); a
    dummy entry closes the list so its length equals the sequence length, which is
    exactly how verl's teacher client reads vLLM's output.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    width = max(num_logprobs, 1)
    out_ids: list[list[int]] = []
    out_lps: list[list[float]] = []
    for t in range(len(ids) - 1):
        if num_logprobs == 0:
            out_ids.append([ids[t + 1]])
            out_lps.append([log_probs[t, ids[t + 1]].item()])
        else:
            values, indices = torch.topk(log_probs[t], num_logprobs)
            out_ids.append(indices.tolist())
            out_lps.append(values.tolist())
    out_ids.append([0] * width)
    out_lps.append([0.0] * width)
    return out_ids, out_lps


class HFGenerateServer:
    """Token-in/token-out generation server for one replica (a Ray actor).

    ``accelerator_id``: Ray's id of the GPU to serve on (see :func:`cuda_device`), with bf16 weights,
    as vLLM serves; ``None`` serves on the CPU in fp32.
    """

    def __init__(
        self, model_path: str, max_model_len: int, response_length: int, seed: int, accelerator_id: str | None = None
    ):
        from transformers import AutoModelForCausalLM, GenerationConfig

        torch.manual_seed(seed)
        self.device = torch.device("cpu") if accelerator_id is None else cuda_device(accelerator_id)
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        config = self.model.config
        generation_config = GenerationConfig.from_model_config(config)
        self.eos_ids = self._as_list(generation_config.eos_token_id) or self._as_list(config.eos_token_id)
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.eos_ids[0]
        self.max_model_len = max_model_len
        self.response_length = response_length
        self.global_steps: int | None = None
        self._queues: dict[tuple[float, float, int], list[_Request]] = {}
        self._batcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @staticmethod
    def _as_list(value: int | list[int] | None) -> list[int]:
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Sample one response; same contract as verl's vLLM server ``generate``."""
        if image_data is not None or video_data is not None:
            raise ValueError("The 'hf' rollout backend is text-only; use vLLM or SGLang for multi-modal data.")
        prompt_ids = [int(t) for t in prompt_ids]
        params = dict(sampling_params)
        extra_fields: dict[str, Any] = {"global_steps": self.global_steps}

        num_prompt_logprobs = params.get("prompt_logprobs")
        if num_prompt_logprobs is not None:
            async with self._lock:
                logits = await asyncio.to_thread(self._forward_logits, prompt_ids)
            ids, lps = prompt_logprobs(logits, prompt_ids, int(num_prompt_logprobs))
            extra_fields["prompt_ids"], extra_fields["prompt_logprobs"] = ids, lps

        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"Prompt length ({len(prompt_ids)}) leaves no room to generate within max_model_len "
                f"({self.max_model_len}); raise actor_rollout_ref.rollout.max_model_len or shorten the prompt."
            )
        max_tokens = params.get("max_tokens", params.get("max_new_tokens", self.response_length))
        max_tokens = max(1, min(int(max_tokens), room))
        request = _Request(prompt_ids, max_tokens, bool(params.get("logprobs", False)), asyncio.Future())
        self._queues.setdefault(_sampling_key(params), []).append(request)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._drain())
        token_ids, log_probs = await request.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if request.want_logprobs else None,
            stop_reason="completed",
            extra_fields=extra_fields,
        )

    def _forward_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([ids], device=self.device)).logits[0]

    async def _drain(self) -> None:
        """Serve queued requests in batches until the queues are empty."""
        await asyncio.sleep(_BATCH_WINDOW_S)
        while self._queues:
            key, requests = next(iter(self._queues.items()))
            del self._queues[key]
            try:
                async with self._lock:
                    results = await asyncio.to_thread(self._generate_batch, requests, *key)
                for request, result in zip(requests, results, strict=True):
                    request.future.set_result(result)
            except Exception as error:  # surface the failure to every waiting caller
                for request in requests:
                    if not request.future.done():
                        request.future.set_exception(error)
        self._release_cache()

    def _release_cache(self) -> None:
        """Hand the generation's cached GPU blocks back after a burst of requests.

        The server is a process of its own on the trainer's GPU (colocated, hybrid mode): blocks
        kept by this process's caching allocator would be missing to the training step that follows.
        """
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate_batch(
        self, requests: list[_Request], temperature: float, top_p: float, top_k: int
    ) -> list[tuple[list[int], list[float]]]:
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros_like(input_ids)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids) :] = 1
        greedy = temperature <= 0.0
        sampling: dict[str, Any] = {"do_sample": not greedy}
        if not greedy:
            sampling.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(r.max_tokens for r in requests),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                output_logits=True,
                return_dict_in_generate=True,
                **sampling,
            )
        new_tokens = output.sequences[:, width:]
        # Log-probs of the distribution sampled from: tempered, not truncated by top-k/top-p,
        # which is what verl's engine recomputes as old_log_probs at the rollout temperature.
        logits = torch.stack(output.logits, dim=1).float()
        if not greedy:
            logits = logits / temperature
        token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, request in enumerate(requests):
            tokens = new_tokens[row, : request.max_tokens].tolist()
            end = next((i + 1 for i, token in enumerate(tokens) if token in self.eos_ids), len(tokens))
            results.append((tokens[:end], token_log_probs[row, :end].tolist()))
        return results

    # ------------------------------------------------------------------ weights
    async def update_weights(
        self,
        state_dict: dict[str, torch.Tensor],
        global_steps: int | None = None,
        peft_config: dict[str, Any] | None = None,
        base_sync_done: bool = True,
    ) -> None:
        """Load trained weights; every name sent must exist in the served model.

        A LoRA student (verl's default ``model.lora.merge=False``) sends what it sends vLLM
        (verl/workers/engine_workers.py:786-806): with ``peft_config`` set, first (once) its base
        weights under the adapter's ``base_layer`` names (``base_sync_done=False``), then at every
        sync only the adapter's tensors, named as PEFT saves them. The served model is wrapped in
        the same adapter the first time one arrives, so it samples from base + adapter in fp32,
        exactly the policy the training engine scores.
        """
        async with self._lock:
            if peft_config is not None:
                self._wrap_in_adapter(peft_config)
            if peft_config is not None and base_sync_done:
                self._load_adapter(state_dict)
            else:
                # With an adapter, the served model's names are the sent ones under PEFT's wrapper prefix.
                prefix = "base_model.model." if peft_config is not None else ""
                self._load_named({prefix + name: tensor for name, tensor in state_dict.items()})
            if global_steps is not None:
                self.global_steps = global_steps
            # One line per sync, so a run's log shows the trained weights arriving.
            if self.device.type == "cuda":
                self._print_peak_memory()
            print(
                f"verl-opd hf rollout: weights for step {global_steps} loaded "
                f"({len(state_dict)} tensors, checksum {self.served_weights_checksum():.8e})",
                flush=True,
            )

    def _print_peak_memory(self) -> None:
        """Log this server's peak GPU memory since the previous sync (a generation phase), then reset it.

        verl's ``perf/max_memory_*`` metrics come from the training worker's process only
        (verl/workers/engine_workers.py:219-220); this is the rollout process's share of the GPU.
        """
        gib = 2**30
        allocated = torch.cuda.max_memory_allocated(self.device) / gib
        reserved = torch.cuda.max_memory_reserved(self.device) / gib
        print(
            f"verl-opd hf rollout: peak GPU memory since the last sync {allocated:.3f} GiB allocated, "
            f"{reserved:.3f} GiB reserved",
            flush=True,
        )
        torch.cuda.reset_peak_memory_stats(self.device)

    def _load_named(self, state_dict: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            raise KeyError(f"hf rollout received weights the served model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in state_dict.items():
                own[name].copy_(tensor.to(own[name].dtype))

    def _wrap_in_adapter(self, peft_config: dict[str, Any]) -> None:
        """Wrap the served model in the student's LoRA adapter (once; the adapter's B starts at 0)."""
        from peft import PeftModel, get_peft_config, get_peft_model

        if not isinstance(self.model, PeftModel):
            self.model = get_peft_model(self.model, get_peft_config(dict(peft_config)))
            self.model.eval()

    def _load_adapter(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state_dict)
        if result.unexpected_keys:
            raise KeyError(
                f"hf rollout received adapter weights the served adapter does not have: "
                f"{sorted(result.unexpected_keys)[:5]}"
            )

    def served_weights_checksum(self) -> float:
        """Sum of |w| over all served parameters: changes whenever trained weights arrive."""
        with torch.no_grad():
            return float(sum(p.double().abs().sum().item() for p in self.model.parameters()))

    # ------------------------------------------------------------------ lifecycle (the cache is freed after each burst)
    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        while self._queues or self._lock.locked():
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reject_request: bool = False, **kwargs: Any) -> dict[str, Any]:
        await self.wait_for_requests_to_drain()
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, **kwargs: Any) -> dict[str, Any]:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class HFReplica(RolloutReplica):
    """One ``hf`` server per replica, placed on the node (and, on CUDA, the GPU) of the replica's first worker.

    As verl's vLLM replica in hybrid mode (vllm_async_server.py:1336-1398): the server is an actor
    that asks Ray for no GPU, pinned to the node of the replica's workers, and serves on the GPU Ray
    gave the first of them; Ray's ``NOSET`` variable keeps the node's ``CUDA_VISIBLE_DEVICES`` in it.
    One process serves a whole replica, so set ``rollout.tensor_model_parallel_size=1`` (one worker,
    one GPU per replica; ``trainer.device=cpu`` sets it): the server then shares exactly its trainer's GPU.
    """

    async def launch_servers(self) -> None:
        from verl.plugin.platform import get_platform
        from verl.utils.device import get_device_name, get_resource_name

        role = "reward" if self.is_reward_model else ("teacher" if self.is_teacher_model else "")
        name = server_actor_name(self.replica_rank, 0, role) + self.name_suffix
        options: dict[str, Any] = {"name": name, "max_concurrency": self.max_concurrency, "num_cpus": 0}
        accelerator_id = None
        if self.workers:
            resource = get_resource_name()
            node_id, accelerator_ids = await self.workers[0].__ray_call__.remote(
                lambda worker: (
                    ray.get_runtime_context().get_node_id(),
                    ray.get_runtime_context().get_accelerator_ids().get(resource, []),
                )
            )
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
            if get_device_name() == "cuda" and accelerator_ids:
                accelerator_id = str(accelerator_ids[0])
                options["runtime_env"] = {"env_vars": {var: "1" for var in get_platform().ray_noset_envvars()}}
        model_path = self.model_config.local_path if hasattr(self.model_config, "local_path") else None
        model_path = model_path or self.model_config.path
        server = (
            ray.remote(HFGenerateServer)
            .options(**options)
            .remote(
                model_path=model_path,
                max_model_len=self.config.max_model_len or (self.config.prompt_length + self.config.response_length),
                response_length=self.config.response_length,
                seed=self.config.seed + self.replica_rank if self.config.seed is not None else self.replica_rank,
                accelerator_id=accelerator_id,
            )
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = ""

    def rollout_worker_use_gpu(self) -> bool:
        return False


class HFServerAdapter(BaseRollout):
    """The training worker's handle on its replica's :class:`HFGenerateServer`."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        world *= self.config.pipeline_model_parallel_size
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.server_handle: ray.actor.ActorHandle | None = None

    def _server(self) -> ray.actor.ActorHandle | None:
        if self.rollout_rank != 0:
            return None
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    @torch.no_grad()
    async def update_weights(self, weights: Any, global_steps: int | None = None, **kwargs: Any) -> None:
        """Gather the full tensors (a collective: every rank iterates) and ship them to the server."""
        if kwargs.get("wire_format", "named_tensors") != "named_tensors":
            raise NotImplementedError("The 'hf' rollout backend only accepts named_tensors weight updates.")
        start = time.time()
        state_dict = {name: tensor.detach().to("cpu").clone() for name, tensor in weights}
        server = self._server()
        if server is not None:
            await server.update_weights.remote(
                state_dict,
                global_steps,
                peft_config=kwargs.get("peft_config"),
                base_sync_done=kwargs.get("base_sync_done", True),
            )
            logger.info("hf rollout: %d tensors updated in %.2fs", len(state_dict), time.time() - start)
