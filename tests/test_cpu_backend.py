"""The CPU backend's parts, each on its own: platform, backend-string patch, CPU settings, ``hf`` rollout server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

from verl_opd.cpu.platform import PlatformCPU
from verl_opd.cpu.rollout import HFGenerateServer, cuda_device, prompt_logprobs
from verl_opd.cpu.settings import CPU_ENV, apply_cpu_settings
from verl_opd.glue.patches import dedup_backend


def test_platform_speaks_torch_cpu():
    platform = PlatformCPU()
    assert platform.device_name == "cpu" and platform.current_device() == "cpu"
    assert platform.communication_backend_name() == "gloo" and platform.ray_resource_name() == "GPU"
    assert platform.device_module.get_device_name() == "CPU"  # verl's flops counter keys on a string
    assert platform.device_module.memory_allocated() == 0  # torch.cuda-only calls become no-ops
    assert torch.ones(2).to(platform.current_device()).device.type == "cpu"


def test_dedup_backend():
    assert dedup_backend("cpu:gloo,cpu:gloo") == "cpu:gloo"
    assert dedup_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert dedup_backend("gloo") == "gloo" and dedup_backend(None) is None


def test_patched_init_process_group_accepts_verl_backend_string():
    code = (
        "import torch.distributed as dist, socket\n"
        "from verl_opd.glue.patches import install_backend_dedup\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "kw = dict(init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
        "try:\n    dist.init_process_group(backend='cpu:gloo,cpu:gloo', **kw); print('unpatched ok')\n"
        "except Exception as e:\n    print('unpatched fails:', type(e).__name__)\n"
        "install_backend_dedup(); install_backend_dedup()\n"
        "dist.init_process_group(backend='cpu:gloo,cpu:gloo', **kw)\n"
        "print('patched', dist.get_backend())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unpatched fails" in proc.stdout and "patched cpu:gloo" in proc.stdout


def test_patched_init_process_group_retries_a_taken_master_port_for_one_process():
    """verl's MASTER_PORT can be taken between its pick and the store's bind: a one-process group retries."""
    code = (
        "import os, socket, torch.distributed as dist\n"
        "from verl_opd.glue.patches import install_backend_dedup\n"
        "taken = socket.socket(); taken.bind(('127.0.0.1', 0)); taken.listen(); port = taken.getsockname()[1]\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))\n"
        "install_backend_dedup()\n"
        "try:\n    dist.init_process_group(backend='cpu:gloo', rank=0, world_size=2, timeout=__import__('datetime')"
        ".timedelta(seconds=5))\n"
        "except dist.DistNetworkError as e:\n    print('two ranks re-raise', 'EADDRINUSE' in str(e))\n"
        "dist.init_process_group(backend='cpu:gloo,cpu:gloo', rank=0, world_size=1)\n"
        "print('one rank ok', dist.get_world_size(), os.environ['MASTER_PORT'] != str(port))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "two ranks re-raise True" in proc.stdout and "one rank ok 1 True" in proc.stdout, proc.stdout


def test_cpu_settings_replace_only_what_cannot_work(monkeypatch):
    for name in CPU_ENV:
        monkeypatch.setenv(name, "unset-by-test")  # restored after the test
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose(
            "ppo_trainer",
            overrides=["trainer.device=cpu", "trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.strategy=fsdp2"],
        )
    changes = apply_cpu_settings(config)
    arr = config.actor_rollout_ref
    assert arr.rollout.name == "hf" and arr.rollout.tensor_model_parallel_size == 1
    assert arr.model.override_config.attn_implementation == "sdpa"
    assert arr.ref.strategy == "fsdp2" and arr.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    assert config.ray_kwargs.ray_init.num_gpus == 2 and config.ray_kwargs.ray_init.num_cpus >= 8
    assert config.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"
    assert "actor_rollout_ref.actor.strategy=fsdp2" not in changes  # the user's compatible choice stays
    assert "actor_rollout_ref.rollout.name=hf" in changes
    import os

    assert os.environ["VERL_PLATFORM"] == "cpu" and os.environ["VERL_ENGINE_DEVICE"] == "cuda"


@pytest.fixture(scope="module")
def server(tiny):
    return HFGenerateServer(str(tiny.student), max_model_len=128, response_length=12, seed=0)


def _forward_log_probs(server: HFGenerateServer, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(server._forward_logits(ids).float(), dim=-1)


def test_hf_server_returns_the_log_probs_of_what_it_sampled(server):
    prompt = [5, 6, 7, 8, 9]

    async def two_requests():
        params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
        return await asyncio.gather(
            server.generate(prompt, dict(params), "a"), server.generate(prompt[:3], dict(params), "b")
        )

    for request_prompt, out in zip((prompt, prompt[:3]), asyncio.run(two_requests()), strict=True):
        assert 1 <= len(out.token_ids) <= 12 and len(out.log_probs) == len(out.token_ids)
        full = request_prompt + out.token_ids
        reference = _forward_log_probs(server, full)
        for i, token in enumerate(out.token_ids):
            position = len(request_prompt) + i - 1  # the log-prob of token t comes from position t-1
            assert out.log_probs[i] == pytest.approx(reference[position, token].item(), abs=1e-4)
        ends_with_eos = out.token_ids[-1] in server.eos_ids
        assert ends_with_eos or len(out.token_ids) == 12
        assert not any(t in server.eos_ids for t in out.token_ids[:-1])  # nothing after the sampled EOS


def test_hf_server_prompt_logprobs_match_vllm_layout(server):
    ids = [5, 6, 7, 8, 9, 10]
    out = asyncio.run(server.generate(ids, {"prompt_logprobs": 0, "max_tokens": 1}, "p"))
    lps, pids = out.extra_fields["prompt_logprobs"], out.extra_fields["prompt_ids"]
    assert len(lps) == len(pids) == len(ids)
    reference = _forward_log_probs(server, ids)
    for t in range(len(ids) - 1):
        assert pids[t] == [ids[t + 1]]
        assert lps[t][0] == pytest.approx(reference[t, ids[t + 1]].item(), abs=1e-5)
    assert lps[-1] == [0.0] and pids[-1] == [0]
    ids_topk, lps_topk = prompt_logprobs(server._forward_logits(ids), ids, 3)
    assert len(ids_topk[0]) == 3 and lps_topk[0] == sorted(lps_topk[0], reverse=True)


def test_hf_server_loads_trained_weights_and_rejects_unknown_ones(tiny):
    server = HFGenerateServer(str(tiny.student), max_model_len=128, response_length=4, seed=0)
    before = server.served_weights_checksum()
    new = {name: torch.zeros_like(p) for name, p in server.model.state_dict().items() if name.endswith("norm.weight")}
    asyncio.run(server.update_weights(new, global_steps=3))
    assert server.served_weights_checksum() != before and server.global_steps == 3
    with pytest.raises(KeyError, match="does not have"):
        asyncio.run(server.update_weights({"not.a.weight": torch.zeros(1)}))


def test_hf_server_serves_on_cpu_in_fp32_without_a_gpu_id(server):
    assert server.device == torch.device("cpu")
    assert {p.dtype for p in server.model.parameters()} == {torch.float32}


def test_cuda_device_maps_rays_gpu_id_to_this_process_index(monkeypatch):
    """Ray's GPU id is the node's CUDA_VISIBLE_DEVICES entry; torch numbers the visible devices from 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert cuda_device("5") == torch.device("cuda", 1) and cuda_device("3") == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="not in this process's CUDA_VISIBLE_DEVICES=3,5"):
        cuda_device("0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_device("2") == torch.device("cuda", 2)  # unset: every GPU of the node, by index


def test_hf_server_serves_a_lora_students_base_then_adapter_as_verl_sends_them(tiny):
    """verl's LoRA sync (merge=False): base weights once under ``base_layer`` names, then the adapter's tensors."""
    from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    student = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny.student),
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name or name.endswith("norm.weight"):
                param.normal_(std=0.1)  # a trained adapter, and base weights that differ from the served ones
    peft_config = student.peft_config["default"].to_dict()
    base = {
        name.removeprefix("base_model.model."): tensor
        for name, tensor in student.state_dict().items()
        if "lora_" not in name
    }
    server = HFGenerateServer(str(tiny.student), max_model_len=128, response_length=4, seed=0)
    asyncio.run(server.update_weights(base, global_steps=0, peft_config=peft_config, base_sync_done=False))
    asyncio.run(server.update_weights(get_peft_model_state_dict(student), 1, peft_config, base_sync_done=True))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(server.model(ids).logits, student(ids).logits)
    with pytest.raises(KeyError, match="adapter weights the served adapter does not have"):
        asyncio.run(server.update_weights({"x.lora_A.weight": torch.zeros(1)}, 2, peft_config, base_sync_done=True))
