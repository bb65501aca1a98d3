"""The pre-flight checker (``verify_opd_implementation.py`` / ``verl-opd doctor``).

In-process runs skip the ``plugin`` group (a fresh interpreter importing verl costs
about 15 s); the one subprocess run of ``verify_opd_implementation.py`` includes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from verl_opd.tools.doctor import Check, check_tokenizers, main, permute_token_ids

REPO = Path(__file__).resolve().parents[1]


def _overrides(tiny) -> list[str]:
    """A config verl's validate_config accepts with one (logical) GPU; no trainer.device=cpu, so the
    doctor does not switch this test process to the CPU platform."""
    return [
        f"data.train_files={tiny.train}",
        f"data.val_files={tiny.test}",
        "data.train_batch_size=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.name=vllm",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        # resume_mode=auto would look for checkpoints under the cwd
        "trainer.resume_mode=disable",
    ]


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["--skip", "plugin", *argv])
    return code, capsys.readouterr().out


def _pair_without_tokenizer_check(tiny) -> tuple[str, ...]:
    """``--student S --teacher T``, the tokenizer section skipped (tested on its own above)."""
    return ("--skip", "tokenizers", "--student", str(tiny.student), "--teacher", str(tiny.teacher))


def _status(output: str, section: str, name: str) -> str:
    """Status of the first line for ``[section] name``."""
    for line in output.splitlines():
        if f"[{section}] {name}" in line:
            return line.split()[0]
    raise AssertionError(f"no [{section}] {name} line in:\n{output}")


@pytest.fixture(scope="module")
def variants(tiny, tmp_path_factory) -> dict[str, Path]:
    """Teachers that must be refused: swapped token ids (same vocab size), another chat template."""
    root = tmp_path_factory.mktemp("doctor_teachers")
    permuted = Path(permute_token_ids(str(tiny.teacher), str(root / "permuted")))
    template = root / "template"
    shutil.copytree(tiny.teacher, template)
    (template / "chat_template.jinja").write_text(
        "{% for message in messages %}[{{ message['role'] }}]: {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]: {% endif %}"
    )
    return {"permuted": permuted, "template": template}


def test_compatible_pair_passes(tiny, capsys):
    code, out = _run(capsys, "--student", str(tiny.student), "--teacher", str(tiny.teacher), *_overrides(tiny))
    assert code == 0, out
    assert "FAIL" not in out
    for name in ("vocabulary ids", "probe texts encode to the same ids", "special tokens", "chat template"):
        assert _status(out, "tokenizers", name) == "PASS"
    assert _status(out, "config", "compose") == "PASS"
    assert _status(out, "config", "verl-opd settings") == "PASS"
    assert _status(out, "config", "verl validate_config") == "PASS"
    assert _status(out, "plugin", "skipped") == "SKIP"
    assert "0 failed: ready for OPD" in out


def test_same_vocab_size_other_ids_fails(tiny, variants, capsys):
    from transformers import AutoTokenizer

    student_vocab = AutoTokenizer.from_pretrained(tiny.student).get_vocab()
    teacher_vocab = AutoTokenizer.from_pretrained(variants["permuted"]).get_vocab()
    assert len(student_vocab) == len(teacher_vocab) and student_vocab != teacher_vocab

    code, out = _run(capsys, "--student", str(tiny.student), "--teacher", str(variants["permuted"]), *_overrides(tiny))
    assert code == 1
    assert _status(out, "tokenizers", "vocabulary ids") == "FAIL"
    assert _status(out, "tokenizers", "probe texts encode to the same ids") == "FAIL"
    assert f"vocab sizes {len(student_vocab)} vs {len(student_vocab)}" in out
    # the driver hook refuses it too, with TokenizerMismatchError's fix
    assert _status(out, "config", "verl-opd settings (TokenizerMismatchError)") == "FAIL"
    assert "opd.check_tokenizers=False" in out


def test_other_chat_template_fails(tiny, variants):
    checks = {c.name: c for c in check_tokenizers(str(tiny.student), str(variants["template"]))}
    assert checks["chat template"].status == "FAIL"
    assert "fix:" in checks["chat template"].detail
    assert checks["vocabulary ids"].status == "PASS"


def test_missing_teacher_fails(tiny, tmp_path, capsys):
    missing = tmp_path / "no_such_teacher"
    code, out = _run(capsys, "--student", str(tiny.student), "--teacher", str(missing), *_overrides(tiny))
    assert code == 1
    assert _status(out, "tokenizers", "teacher") == "FAIL"
    assert "does not exist" in out
    # the driver hook names the key and the fix
    assert "opd.teacher.model_path=" in out and "save_pretrained" in out


@pytest.mark.parametrize(
    ("extra", "config_name", "expected"),
    [
        (["actor_rollout_ref.actor.use_kl_loss=True"], "opd_trainer", "use_kl_loss=False"),
        (["opd.discount=1.5"], "opd_trainer", "must be in [0, 1]"),
        ([], "ppo_trainer", "add algorithm.adv_estimator=opd"),
        (["trainer.use_v1=False"], "opd_trainer", "set trainer.use_v1=True"),
        (["opd.no_such_key=1"], "opd_trainer", "To append to your config use +opd.no_such_key=1"),
        (["data.train_batch_size=3"], "opd_trainer", "verl validate_config"),
    ],
)
def test_config_refusals(tiny, capsys, extra, config_name, expected):
    code, out = _run(
        capsys,
        "--skip",
        "tokenizers",
        "--config-name",
        config_name,
        "--student",
        str(tiny.student),
        "--teacher",
        str(tiny.teacher),
        *_overrides(tiny),
        *extra,
    )
    assert code == 1, out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed and all("[config]" in line for line in failed), out
    assert expected in out


def test_ppo_trainer_with_opd_estimator_passes(tiny, capsys):
    code, out = _run(
        capsys,
        "--skip",
        "tokenizers",
        "--config-name=ppo_trainer",
        "--student",
        str(tiny.student),
        "--teacher",
        str(tiny.teacher),
        "algorithm.adv_estimator=opd",
        *_overrides(tiny),
    )
    assert code == 0, out
    assert "algorithm.adv_estimator=opd applied" in out


def test_selftest_passes(capsys):
    code, out = _run(capsys, "--selftest")
    assert code == 0, out
    for name in ("teacher == student copy", "distinct teacher", "log-prob alignment", "advantage = teacher - student"):
        assert _status(out, "selftest", name) == "PASS"
    assert "advantages exactly 0" in out


def test_nothing_to_check_is_an_error(capsys):
    assert main([]) == 2


def test_check_line_format():
    line = Check("config", "x", "FAIL", "first\nsecond").line()
    assert line == "FAIL  [config] x: first\n      second"


def test_script_subprocess_with_plugin_check(tiny, tmp_path):
    """The top-level script, as a user runs it, including the fresh-process plugin check."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "verify_opd_implementation.py"),
            "--student",
            str(tiny.student),
            "--teacher",
            str(tiny.teacher),
            "--skip",
            "config",
            "--skip",
            "tokenizers",  # both covered in-process above; keeps this run to the fresh-process plugin check
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for name in ("entry point", "loads in a fresh process", "advantage estimator 'opd'", "trainer 'opd'"):
        assert _status(out, "plugin", name) == "PASS", out
    assert _status(out, "versions", "verl") == "PASS"
    assert _status(out, "tokenizers", "skipped") == "SKIP"


def test_doctor_subcommand_parser():
    """``add_doctor_parser`` plugs the same options into a ``verl-opd`` subcommand."""
    import argparse

    from verl_opd.tools.doctor import add_doctor_parser, run_doctor

    parser = argparse.ArgumentParser(prog="verl-opd")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", "--student", "s", "--teacher", "t", "--skip", "plugin", "a=1", "+b=2"])
    assert args.func is run_doctor
    assert (args.student, args.teacher, args.skip, args.overrides) == ("s", "t", ["plugin"], ["a=1", "+b=2"])
    assert args.config_name == "opd_trainer" and args.selftest is False


def test_readme_form_on_a_compatible_pair_is_ready(tiny, capsys):
    """``--student S --teacher T`` alone: the run's keys are not the pair's, so they are SKIP, not FAIL."""
    code, out = _run(capsys, "--student", str(tiny.student), "--teacher", str(tiny.teacher))
    assert code == 0, out
    assert _status(out, "config", "verl-opd settings") == "PASS"
    assert _status(out, "config", "run") == "SKIP"
    assert "not checked: no overrides given" in out
    assert "0 failed: ready for OPD" in out


def test_run_keys_not_given_are_skipped_with_what_to_pass(tiny, capsys):
    given = [
        "data.train_batch_size=8",  # verl's default 8 GPUs: a batch they divide
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "trainer.resume_mode=disable",
    ]
    args = _pair_without_tokenizer_check(tiny)
    code, out = _run(capsys, *args, *given)
    assert code == 0, out
    for name, fix in (
        ("actor_rollout_ref.rollout.name", "pass actor_rollout_ref.rollout.name=vllm"),
        ("data.train_files", "pass data.train_files=<parquet>"),
        ("data.val_files", "pass data.val_files=<parquet>"),
        ("resources", "pass trainer.n_gpus_per_node=N"),
    ):
        assert _status(out, "config", name) == "SKIP", out
        assert fix in out
    assert _status(out, "config", "verl validate_config") == "PASS"
    assert "with actor_rollout_ref.rollout.name=vllm in place of the unset key" in out


@pytest.fixture
def cpu_env(monkeypatch):
    """A trainer.device=cpu config makes the doctor export the CPU platform's variables: restored after."""
    from verl_opd.cpu import register
    from verl_opd.cpu.settings import CPU_ENV

    register()  # idempotent; another test module's import order may have left verl without the cpu platform
    for name in CPU_ENV:
        monkeypatch.setenv(name, "unset-by-test")


def _cpu_overrides(tiny) -> list[str]:
    return [o for o in _overrides(tiny) if not o.startswith(("trainer.n", "actor_rollout_ref.rollout.name="))] + [
        "trainer.device=cpu"
    ]


def test_cpu_run_without_device_keys_gets_cpu_defaults(tiny, capsys, cpu_env):
    code, out = _run(capsys, *_pair_without_tokenizer_check(tiny), *_cpu_overrides(tiny))
    assert code == 0, out
    assert "trainer.device=cpu defaults applied: trainer.n_gpus_per_node=1, trainer.nnodes=1" in out
    assert _status(out, "config", "resources") == "PASS"


def test_resources_ray_cannot_satisfy_are_not_ready(tiny, capsys, cpu_env):
    args = _pair_without_tokenizer_check(tiny)
    code, out = _run(capsys, *args, *_cpu_overrides(tiny), "trainer.nnodes=2")
    assert code == 1, out
    assert _status(out, "config", "resources") == "FAIL"
    assert "set trainer.nnodes=1" in out and "NOT ready for OPD" in out


def test_gpu_request_on_a_machine_without_gpus_is_a_warning(tiny, capsys, monkeypatch):
    """The doctor needs no GPU: a GPU run checked on a GPU-less machine is WARN (main_ppo here refuses it)."""
    from verl_opd.checks import resources

    monkeypatch.setattr(resources, "visible_devices", lambda: (0, "GPU"))
    args = _pair_without_tokenizer_check(tiny)
    code, out = _run(capsys, *args, *_overrides(tiny))
    assert code == 0, out
    assert _status(out, "config", "resources") == "WARN"
    assert "this machine has no GPU, so main_ppo would refuse the run here" in out

    monkeypatch.setattr(resources, "visible_devices", lambda: (1, "GPU"))  # on the GPU machine: not enough is FAIL
    code, out = _run(capsys, *args, *_overrides(tiny), "trainer.n_gpus_per_node=2")
    assert code == 1, out
    assert _status(out, "config", "resources") == "FAIL"
    assert "set trainer.n_gpus_per_node=1" in out


def test_bad_train_parquet_is_not_ready(tiny, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    no_prompt = tmp_path / "no_prompt.parquet"
    pq.write_table(pa.table({"question": ["1+1"]}), no_prompt)
    args = ("--skip", "tokenizers", "--student", str(tiny.student), "--teacher", str(tiny.teacher), *_overrides(tiny))
    for path, expected in ((empty, "has 0 rows"), (no_prompt, "has no column 'prompt' (data.prompt_key)")):
        code, out = _run(capsys, *args, f"data.train_files={path}")
        assert code == 1, out
        assert _status(out, "config", "data.train_files") == "FAIL"
        assert str(path) in out and expected in out
        assert _status(out, "config", "data.val_files") == "PASS"


def test_teacher_without_weights_is_not_ready(tiny, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny.teacher, teacher, ignore=shutil.ignore_patterns("*.safetensors"))
    code, out = _run(capsys, "--student", str(tiny.student), "--teacher", str(teacher), *_overrides(tiny))
    assert code == 1, out
    assert _status(out, "tokenizers", "vocabulary ids") == "PASS"  # its tokenizer is fine: the weights are not
    assert _status(out, "config", "verl-opd settings (OPDConfigError)") == "FAIL"
    assert "opd.teacher.model_path=" in out and "no weight files were found" in out


def test_overrides_are_parsed_by_hydra(tiny, capsys):
    """A quoted teacher path in the overrides is read as the path; a malformed override is named, not ignored."""
    code, out = _run(
        capsys,
        "--skip",
        "tokenizers",
        "--student",
        str(tiny.student),
        f"opd.teacher.model_path='{tiny.teacher}'",
        *_overrides(tiny),
    )
    assert code == 0, out
    assert main(["--skip", "plugin", "--student", "s", "bad=[unclosed"]) == 2
    assert "the Hydra overrides do not parse" in capsys.readouterr().out


def test_teacher_of_another_family(tiny, other_teacher, capsys):
    """Refused under view=student with view=own as the fix; ready with opd.teacher.view=own in the overrides."""
    same_view = {c.name: c for c in check_tokenizers(str(tiny.student), str(other_teacher))}
    assert same_view["probe texts encode to the same ids"].status == "FAIL"
    assert "opd.teacher.view=own" in same_view["probe texts encode to the same ids"].detail

    code, out = _run(
        capsys,
        "--student",
        str(tiny.student),
        "--teacher",
        str(other_teacher),
        *_overrides(tiny),
        "opd.teacher.view=own",
    )
    assert code == 0, out
    for name in ("student tokenizer is byte-level BPE", "teacher byte table round trip", "student eos token"):
        assert _status(out, "tokenizers", name) == "PASS"
    assert _status(out, "tokenizers", "teacher chat template") == "PASS"
    assert "end of turn ['<|eot_id|>']" in out
    # both renderings of the probe conversation: the teacher's Llama-3-like header, the student's ChatML
    assert "<|start_header_id|>user<|end_header_id|>" in out and "<|im_start|>user" in out
    assert _status(out, "tokenizers", "boundary-lookahead shaping") == "PASS"
    assert "the tokenizers differ: opd.teacher.shaping=auto adds both models' potentials" in out
    assert _status(out, "config", "verl-opd settings") == "PASS"
