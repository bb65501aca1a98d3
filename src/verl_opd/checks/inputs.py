"""Checks of the files a run points at, before Ray starts and before any model loads.

Without them a teacher directory without weights fails only after Ray and model
init (with an ``OSError``, or blamed on the tokenizer when only ``config.json`` is
there), and a data file without the prompt column fails inside a Ray worker. The
driver hook (:func:`verl_opd.glue.driver.configure`) runs them for every run; the doctor
calls the same functions to report each one.
"""

from __future__ import annotations

import glob
import os

from omegaconf import DictConfig, ListConfig, OmegaConf

from verl_opd.config.opd_config import OPDConfig, OPDConfigError
from verl_opd.core.routing import dotted_field

STUDENT_KEY = "actor_rollout_ref.model.path"
TEACHER_KEY = "opd.teacher.model_path"
DATA_KEYS = ("data.train_files", "data.val_files")
# What transformers' from_pretrained loads: single files, or the index of a sharded checkpoint.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_weights(path: str, key: str) -> None:
    """Refuse a local model directory ``path`` (given as ``key``) that holds no weight files."""
    if any(glob.glob(os.path.join(path, pattern)) for pattern in WEIGHT_PATTERNS):
        return
    raise OPDConfigError(
        f"{key}={path!r}: no weight files were found there (none of {', '.join(WEIGHT_PATTERNS)}). Point {key} at "
        "a directory saved with save_pretrained (model.save_pretrained writes model.safetensors), or finish "
        "copying the model."
    )


def check_student(config: DictConfig) -> None:
    """The student's weights, when ``actor_rollout_ref.model.path`` is a local directory (verl also takes hub ids)."""
    path = OmegaConf.select(config, STUDENT_KEY)
    if isinstance(path, str) and os.path.isdir(os.path.expanduser(path)):
        check_model_weights(os.path.expanduser(path), STUDENT_KEY)


def data_files(config: DictConfig, key: str) -> list[str]:
    """The files ``key`` names (verl takes one path or a list)."""
    value = OmegaConf.select(config, key)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, ListConfig)) else [str(value)]


def check_data_file(path: str, key: str, prompt_key: str | None) -> int | None:
    """Refuse a missing local data file, or a parquet file that is empty or lacks ``prompt_key``.

    Returns a parquet file's row count (None for verl's other format, json/jsonl). Reads only the
    parquet footer (row count and schema): milliseconds whatever the file's size.
    ``prompt_key=None`` skips the column check (a custom dataset class reads its own columns).
    """
    import pyarrow.parquet as pq

    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise OPDConfigError(
            f"{key}: {path!r} not found. Point {key} at parquet files in verl's RL schema (a "
            f"'{prompt_key or 'prompt'}' column of chat messages); for a smoke test: `verl-opd tiny data --out DIR`."
        )
    if not local.endswith(".parquet"):  # verl also reads .json/.jsonl (utils/dataset/rl_dataset.py:173-178)
        return None
    try:
        meta = pq.ParquetFile(local)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise OPDConfigError(f"{key}: {path!r} is not a readable parquet file ({type(exc).__name__}: {exc}).") from exc
    rows, columns = meta.metadata.num_rows, meta.schema_arrow.names
    if rows == 0:
        raise OPDConfigError(f"{key}: {path!r} has 0 rows; verl would have nothing to train or validate on.")
    if prompt_key is not None and prompt_key not in columns:
        raise OPDConfigError(
            f"{key}: {path!r} has no column {prompt_key!r} (data.prompt_key), only {columns}: rename the prompt "
            f"column to {prompt_key!r}, or set data.prompt_key=<its name>."
        )
    return rows


def prompt_column(config: DictConfig) -> str | None:
    """The column verl's dataset reads prompts from (``data.prompt_key``); None with a custom dataset class."""
    if OmegaConf.select(config, "data.custom_cls.path"):
        return None
    return OmegaConf.select(config, "data.prompt_key") or "prompt"


def check_data_files(config: DictConfig, key: str) -> list[str]:
    """Each local file of ``key`` (``data.train_files`` or ``data.val_files``); return them (remote URLs are verl's)."""
    local = [path for path in data_files(config, key) if "://" not in path]
    for path in local:
        check_data_file(path, key, prompt_column(config))
    return local


def _routing_samples(path: str, teacher_field: str | None) -> list[tuple[object, object]]:
    """The distinct ``(data_source, opd.teacher_field value)`` pairs of a parquet file (only those columns read)."""
    import pyarrow.parquet as pq

    columns = pq.ParquetFile(path).schema_arrow.names
    top = teacher_field.split(".")[0] if teacher_field else None
    wanted = [name for name in ("data_source", top) if name in columns]
    rows = pq.read_table(path, columns=wanted).to_pylist()
    return sorted(
        {(row.get("data_source"), dotted_field(row, teacher_field) if teacher_field else None) for row in rows},
        key=str,
    )


def check_teacher_routing(config: DictConfig) -> None:
    """Refuse local parquet data with a sample no teacher of ``opd.teachers`` would score, naming the values.

    The reference worker routes each sample by :meth:`verl_opd.core.routing.TeacherRoutes.index`; a sample it
    cannot route would stop the run at its first step, after every model loaded. Only the ``data_source``
    column and the top-level column of ``opd.teacher_field`` are read.
    """
    opd = OPDConfig.from_config(config)
    if not opd.teachers:
        return
    routes = opd.routes()
    for key in DATA_KEYS:
        for path in data_files(config, key):
            local = os.path.expanduser(path)
            if "://" in path or not local.endswith(".parquet"):
                continue
            sources, names = routes.uncovered(_routing_samples(local, opd.teacher_field))
            if names:
                raise OPDConfigError(
                    f"{key}: {path!r} names teachers {names} in {opd.teacher_field} (opd.teacher_field), but the "
                    f"teachers are {list(routes.names)}: add opd.teachers.<name> for them, or fix those rows."
                )
            if sources:
                raise OPDConfigError(
                    f"{key}: {path!r} has data_source values {sources} that no teacher scores (opd.teachers."
                    f"<name>.data_sources cover {sorted(routes.by_source)}). Add each to a teacher's list, e.g. "
                    f'"+opd.teachers.{routes.names[0]}.data_sources=[...,{sources[0]}]", or name the teacher per '
                    "sample with opd.teacher_field=extra_info.teacher."
                )
