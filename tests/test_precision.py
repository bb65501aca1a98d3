"""opd.precision=bf16: a bf16 body with an fp32 LM head gives fp32 logits, close to full fp32 (spec rule 10).

The bounds come from ``benchmarks/precision.py`` (results in benchmarks/results/precision.md), which
emulates verl's bf16 FSDP engine on CPU (bf16 parameters, fp32 buffers, bf16 autocast) on the tests'
tiny random pair. Measured on 3 input seeds (64 addition problems each, ~554 response tokens):

* fp32 head: advantage error (vs full fp32) mean 5.85e-4 .. 6.10e-4, max 2.27e-3 .. 3.23e-3; log-prob
  error max <= 2.44e-3 on either model; precision probe <= 0.002.
* verl's bf16 head, log-softmaxed in fp32 (flash-attn's cross-entropy on a GPU): advantage error mean
  1.16e-3 .. 1.28e-3, i.e. 1.9x .. 2.2x the fp32 head's.
* verl's bf16 head as it runs without flash-attn (bf16 log-softmax): mean 1.50e-2 .. 1.52e-2 (25x), every
  log-prob on the bf16 grid (probe 1.0).

Bounds are set about 1.6-2x above the worst seed (CPU bf16 kernels may round differently on another ISA),
and the ratios below the smallest measured one; the inputs are fixed, so a run is deterministic.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM

from verl_opd.glue.precision import FP32HeadWorker, fp32_linear, install_fp32_head

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("precision_bench", REPO / "benchmarks" / "precision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured(bench, tiny) -> dict:
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    return bench.measure_pair(load(tiny.student), load(tiny.teacher), bench.addition_batch(tiny.student, 64, seed=0))


def test_fp32_head_is_close_to_full_fp32(measured):
    fp32_head = measured["fp32_head"]
    assert measured["tokens"] > 500
    assert fp32_head["advantage_error"]["mean"] < 1.0e-3
    assert fp32_head["advantage_error"]["max"] < 6.0e-3
    assert fp32_head["student_log_prob_error"]["max"] < 5.0e-3
    assert fp32_head["teacher_log_prob_error"]["max"] < 5.0e-3
    assert fp32_head["student_lowp_frac"] < 0.05 and fp32_head["teacher_lowp_frac"] < 0.05


def test_bf16_head_is_worse(measured):
    fp32_head = measured["fp32_head"]["advantage_error"]["mean"]
    assert measured["bf16_head_fp32_softmax"]["advantage_error"]["mean"] > 1.3 * fp32_head
    bf16 = measured["bf16_head"]
    assert bf16["advantage_error"]["mean"] > 10 * fp32_head
    assert bf16["student_lowp_frac"] > 0.95 and bf16["teacher_lowp_frac"] > 0.95  # bf16 values, seen by the probe


def test_fp32_head_under_autocast_trains_the_same_weight(tiny):
    """Under bf16 autocast the head returns fp32 logits and its gradient reaches the (shared) weight."""
    model = AutoModelForCausalLM.from_pretrained(tiny.student, dtype=torch.float32)
    head = install_fp32_head(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
        bf16_reference = torch.nn.functional.linear(torch.ones(2, head.in_features), head.weight)
    assert logits.dtype == torch.float32 and bf16_reference.dtype == torch.bfloat16
    logits.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    hidden = torch.randn(3, head.in_features)
    torch.testing.assert_close(fp32_linear(head, hidden), hidden @ head.weight.T)


def test_worker_reset_installs_the_head_on_the_engine_module(tiny, monkeypatch):
    """verl (re)builds the module in reset(); FP32HeadWorker puts the fp32 head on whatever it built."""
    from verl.workers.engine_workers import TrainingWorker

    model = AutoModelForCausalLM.from_pretrained(tiny.student, dtype=torch.float32)
    worker = object.__new__(FP32HeadWorker)  # no process group: only reset() is exercised
    worker.engine = type("Engine", (), {"module": model})()
    monkeypatch.setattr(TrainingWorker, "reset", lambda self: None)
    worker.reset()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert model(input_ids=torch.tensor([[1, 2]])).logits.dtype == torch.float32


def test_head_must_be_a_linear(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny.student, dtype=torch.float32)
    model.set_output_embeddings(torch.nn.Sequential(torch.nn.Linear(32, 256)))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        install_fp32_head(model)
    with pytest.raises(TypeError, match="no Hugging Face causal LM"):
        install_fp32_head(torch.nn.Linear(2, 2))
