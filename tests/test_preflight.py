"""Issue 10: the driver hook's CPU defaults, command-line detection, resource and input checks (no Ray)."""

from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig

from verl_opd.checks import overrides, resources
from verl_opd.checks.inputs import check_data_file, check_model_weights, check_student
from verl_opd.checks.resources import ResourceError, apply_cpu_defaults, check_resources
from verl_opd.config.opd_config import OPDConfigError
from verl_opd.cpu.settings import CPU_ENV
from verl_opd.glue.patches import install_placement_timeout


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    from verl_opd.cpu import register

    # idempotent; a test module that imports verl_opd.cpu.platform first makes verl load the plugin while
    # that module is half-imported, which leaves verl without the cpu platform (see test_benchmarks.py)
    register()
    for name in (*CPU_ENV, "RAY_ADDRESS", resources.PLACEMENT_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)  # configure() exports the CPU platform; restored after


def _compose(args: list[str], config_name: str = "ppo_trainer"):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose(config_name, overrides=args)


# ------------------------------------------------------------------------------------- command line


def test_overrides_are_read_with_hydras_parser():
    args = ["trainer.device=cpu", "+opd.teacher.model_path='/a b/t'", "++x.y=3", "~trainer.nnodes", "x.y=4"]
    assert overrides.given_keys(args) == {"trainer.device", "opd.teacher.model_path", "x.y", "trainer.nnodes"}
    assert overrides.value(args, "opd.teacher.model_path") == "/a b/t"  # quotes are Hydra's, not the value's
    assert overrides.value(args, "x.y") == "4"  # the last one wins
    assert overrides.value(args, "trainer.nnodes") is None  # deleted, not set
    assert overrides.without(args, "x.y") == [args[0], args[1], args[3]]
    # a prefix of a key is another key (a regex on "trainer.n" would match both)
    assert "trainer.n_gpus_per_node" not in overrides.given_keys(["trainer.n_gpus_per_node_x=1"])


def test_overrides_come_from_the_running_hydra_app():
    assert overrides.from_hydra() is None  # no @hydra.main here
    with initialize_config_module("verl.trainer.config", version_base=None):
        hydra_cfg = compose(
            "ppo_trainer", overrides=["trainer.device=cpu", "trainer.nnodes=1"], return_hydra_config=True
        )
    try:
        HydraConfig.instance().set_config(hydra_cfg)  # what @hydra.main does before calling main_ppo's main
        assert overrides.from_hydra() == ["trainer.device=cpu", "trainer.nnodes=1"]
        config = _compose(["trainer.device=cpu", "trainer.nnodes=1"])
        from verl_opd.glue.driver import configure

        configure(config, check_environment=False)  # no overrides given: read from HydraConfig
        assert config.trainer.n_gpus_per_node == 1 and config.trainer.nnodes == 1
    finally:
        HydraConfig.instance().cfg = None


# ------------------------------------------------------------------------------------- CPU defaults


def test_cpu_defaults_fill_only_keys_the_command_line_leaves_out(caplog):
    args = ["trainer.device=cpu"]
    config = _compose(args)
    assert config.trainer.n_gpus_per_node == 8  # verl's default: 8 bundles of 3 CPUs, a local Ray waits forever
    with caplog.at_level(logging.WARNING, logger="verl_opd"):
        assert apply_cpu_defaults(config, args) == ["trainer.n_gpus_per_node=1", "trainer.nnodes=1"]
    assert config.trainer.n_gpus_per_node == 1 and config.trainer.nnodes == 1
    assert "trainer.device=cpu defaults applied: trainer.n_gpus_per_node=1, trainer.nnodes=1" in caplog.text

    args = ["trainer.device=cpu", "trainer.n_gpus_per_node=2"]
    config = _compose(args)
    assert apply_cpu_defaults(config, args) == ["trainer.nnodes=1"]
    assert config.trainer.n_gpus_per_node == 2

    config = _compose(args[:1])
    assert apply_cpu_defaults(config, None) == []  # command line unknown (a config built in Python): kept
    assert config.trainer.n_gpus_per_node == 8


def test_cpu_settings_give_ray_the_cpus_the_placement_groups_ask_for():
    from verl_opd.cpu.settings import apply_cpu_settings

    for workers, cpus in ((1, 8), (2, 11), (4, 17)):
        config = _compose(["trainer.device=cpu", f"trainer.n_gpus_per_node={workers}"])
        apply_cpu_settings(config)
        ray_init = config.ray_kwargs.ray_init
        assert (ray_init.num_gpus, ray_init.num_cpus) == (workers, cpus)
        assert ray_init.num_cpus >= resources.CPUS_PER_BUNDLE * workers + resources.SPARE_CPUS
        check_resources(config)


# ------------------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.nnodes=2"], "set trainer.nnodes=1"),
        (["+ray_kwargs.ray_init.address=10.0.0.1:6379"], "unset both for a CPU run"),
        (["+ray_kwargs.ray_init.num_gpus=1", "trainer.n_gpus_per_node=2"], "set ray_kwargs.ray_init.num_gpus=2"),
        (["+ray_kwargs.ray_init.num_cpus=4"], "set ray_kwargs.ray_init.num_cpus=8"),
        (["trainer.n_gpus_per_node=0"], "trainer.n_gpus_per_node / trainer.nnodes must be >= 1"),
    ],
)
def test_cpu_requests_ray_cannot_satisfy_are_refused(args, expected):
    config = _compose(["trainer.device=cpu", "trainer.n_gpus_per_node=1", *args])
    with pytest.raises(ResourceError, match=None) as err:
        check_resources(config)
    assert expected in str(err.value)


def test_gpu_requests_are_checked_against_this_machine(monkeypatch):
    monkeypatch.setattr(resources, "visible_devices", lambda: (0, "GPU"))
    with pytest.raises(ResourceError) as err:
        check_resources(_compose([]))  # verl's default: 8 GPUs
    message = str(err.value)
    assert "ask for 8 GPU(s)" in message and "this machine shows 0" in message
    assert "trainer.n_gpus_per_node" in message and "trainer.device=cpu" in message

    monkeypatch.setattr(resources, "visible_devices", lambda: (4, "GPU"))
    with pytest.raises(ResourceError, match="set trainer.n_gpus_per_node=4"):
        check_resources(_compose([]))
    with pytest.raises(ResourceError, match="distillation.n_gpus_per_node"):  # verl's teacher pool counts too
        check_resources(_compose(["trainer.n_gpus_per_node=4", "distillation.enabled=True"]))
    with pytest.raises(ResourceError, match="no Ray cluster is given"):
        check_resources(_compose(["trainer.n_gpus_per_node=4", "trainer.nnodes=2"]))
    monkeypatch.setattr(resources, "_local_cpus", lambda: 8.0)
    with pytest.raises(ResourceError, match="set ray_kwargs.ray_init.num_cpus=12"):
        check_resources(_compose(["trainer.n_gpus_per_node=4"]))
    check_resources(_compose(["trainer.n_gpus_per_node=2"]))  # 2 GPUs, 6 of 8 CPUs: fits

    # an existing cluster is not visible before Ray starts: left to the placement timeout
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_resources(_compose(["trainer.nnodes=4"]))


class _Group:
    def __init__(self, ready: bool):
        self.ready, self.waited = ready, None

    def wait(self, timeout_seconds: float) -> bool:
        self.waited = timeout_seconds
        return self.ready


class _FakeBase:
    """Stands for verl.single_controller.ray.base: only its module-level ``placement_group`` name."""

    def __init__(self, ready: bool):
        self.group = _Group(ready)
        self.placement_group = lambda bundles, **kwargs: self.group


def test_placement_timeout_ends_a_wait_ray_cannot_satisfy(monkeypatch):
    ray_pg = importlib.import_module("ray.util.placement_group")  # ray.util's attribute is the function
    removed = []
    monkeypatch.setattr(ray_pg, "remove_placement_group", removed.append)
    base = _FakeBase(ready=False)
    install_placement_timeout(base)
    wrapped = base.placement_group
    install_placement_timeout(base)
    assert base.placement_group is wrapped  # idempotent
    with pytest.raises(ResourceError) as err:
        base.placement_group(bundles=[{"CPU": 3, "GPU": 1}] * 8, strategy="STRICT_PACK")
    assert base.group.waited == resources.DEFAULT_PLACEMENT_TIMEOUT_S
    assert removed == [base.group]  # the pending request is withdrawn
    assert "8 bundle(s) of {'CPU': 3, 'GPU': 1}" in str(err.value)
    assert "trainer.n_gpus_per_node" in str(err.value) and resources.PLACEMENT_TIMEOUT_ENV in str(err.value)

    ready = _FakeBase(ready=True)
    install_placement_timeout(ready)
    monkeypatch.setenv(resources.PLACEMENT_TIMEOUT_ENV, "5")
    assert ready.placement_group(bundles=[{"CPU": 3}]) is ready.group and ready.group.waited == 5
    monkeypatch.setenv(resources.PLACEMENT_TIMEOUT_ENV, "0")  # 0: verl's behaviour, wait forever
    assert resources.placement_timeout_s() is None


def test_placement_timeout_is_installed_in_verls_module():
    """The plugin's ``driver.install`` wraps only the name verl's RayResourcePool calls."""
    import verl.single_controller.ray.base as base

    from verl_opd.glue.driver import install

    install()
    assert getattr(base.placement_group, "_verl_opd_patched", False)
    ray_pg = importlib.import_module("ray.util.placement_group")
    assert base.placement_group.__wrapped__ is ray_pg.placement_group
    assert not getattr(ray_pg.placement_group, "_verl_opd_patched", False)  # Ray's own name is untouched


# ------------------------------------------------------------------------------------- inputs


def test_model_directory_without_weights_is_refused(tiny, tmp_path):
    no_weights = tmp_path / "teacher"
    shutil.copytree(tiny.teacher, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert (no_weights / "config.json").exists() and (no_weights / "tokenizer.json").exists()
    with pytest.raises(OPDConfigError) as err:
        check_model_weights(str(no_weights), "opd.teacher.model_path")
    assert "opd.teacher.model_path=" in str(err.value) and "no weight files were found" in str(err.value)

    (no_weights / "model.safetensors.index.json").write_text("{}")  # a sharded checkpoint's index counts
    check_model_weights(str(no_weights), "opd.teacher.model_path")

    student = tmp_path / "student"
    shutil.copytree(tiny.student, student, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(OPDConfigError, match="actor_rollout_ref.model.path="):
        check_student(_compose([f"actor_rollout_ref.model.path={student}"]))
    check_student(_compose(["actor_rollout_ref.model.path=Qwen/Qwen3-8B"]))  # a hub id is verl's to fetch


def test_teacher_weights_are_checked_before_its_tokenizer(tiny, tmp_path):
    """A teacher directory with only config.json was blamed on the tokenizer; now the weights are named."""
    from verl_opd.config.opd_config import apply_opd_settings

    only_config = tmp_path / "teacher"
    only_config.mkdir()
    shutil.copy(tiny.teacher / "config.json", only_config)
    config = _compose(
        [f"actor_rollout_ref.model.path={tiny.student}", f"opd.teacher.model_path={only_config}"], "opd_trainer"
    )
    with pytest.raises(OPDConfigError, match="no weight files were found") as err:
        apply_opd_settings(config)
    assert "opd.teacher.model_path=" in str(err.value) and "tokenizer" not in str(err.value)


def _parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_data_files_are_checked_from_parquet_metadata(tiny, tmp_path):
    assert check_data_file(str(tiny.train), "data.train_files", "prompt") == 64
    with pytest.raises(OPDConfigError, match="data.train_files: '.*missing.parquet' not found"):
        check_data_file(str(tmp_path / "missing.parquet"), "data.train_files", "prompt")
    empty = _parquet(tmp_path / "empty.parquet", {"prompt": pa.array([], pa.string())})
    with pytest.raises(OPDConfigError, match="has 0 rows"):
        check_data_file(str(empty), "data.val_files", "prompt")
    no_prompt = _parquet(tmp_path / "q.parquet", {"question": ["1+1"]})
    with pytest.raises(OPDConfigError) as err:
        check_data_file(str(no_prompt), "data.train_files", "prompt")
    assert f"'{no_prompt}' has no column 'prompt' (data.prompt_key), only ['question']" in str(err.value)
    assert "data.prompt_key=" in str(err.value)
    assert check_data_file(str(no_prompt), "data.train_files", "question") == 1  # data.prompt_key=question
    assert check_data_file(str(no_prompt), "data.train_files", None) == 1  # a custom dataset class
    garbage = tmp_path / "bad.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(OPDConfigError, match="not a readable parquet file"):
        check_data_file(str(garbage), "data.train_files", "prompt")
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"prompt": []}\n')
    assert check_data_file(str(jsonl), "data.train_files", "prompt") is None  # verl reads json too


def test_driver_checks_data_files_for_every_run(tiny, tmp_path):
    from verl_opd.glue.driver import configure

    no_prompt = _parquet(tmp_path / "q.parquet", {"question": ["1+1"]})
    args = [
        "trainer.device=cpu",
        "algorithm.adv_estimator=grpo",
        f"actor_rollout_ref.model.path={tiny.student}",
        f"data.train_files={tiny.train}",
        f"data.val_files={no_prompt}",
    ]
    with pytest.raises(OPDConfigError, match="data.val_files: .* has no column 'prompt'"):
        configure(_compose(args), args)
    configure(_compose(args), args, check_environment=False)  # the doctor reports files and machine itself
