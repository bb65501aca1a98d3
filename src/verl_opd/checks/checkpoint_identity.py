"""Which teacher a student checkpoint was distilled from, and whether that checkpoint can be resumed.

verl's checkpoints hold only the student. Resuming against another teacher would
silently change the training target halfway, so each OPD checkpoint records the
teacher's path and a fingerprint of its files, and a resume against a teacher with
another fingerprint is refused before any model is loaded. The same check refuses a
checkpoint whose files are visibly damaged (a truncated save), which verl would only
discover deep in the run, and points at the previous intact step instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import zipfile
from typing import Any

from omegaconf import DictConfig

from verl_opd.config.opd_config import OPDConfig, OPDConfigError

logger = logging.getLogger(__name__)

IDENTITY_FILE = "opd_teacher.json"
# 1: config/tokenizer files + weight-file names and sizes (checkpoints written before the scheme was recorded).
# 2: scheme 1 + sampled byte ranges of every weight file (see teacher_fingerprint).
FINGERPRINT_SCHEME = 2
_KNOWN_SCHEMES = (1, 2)
_FINGERPRINTED = ("config.json", "tokenizer.json", "tokenizer_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
HEAD_BYTES = 1 << 20
RANGE_BYTES = 1 << 16
RANGE_COUNT = 128
# identity key -> the opd key it records; a change on resume changes the training target, so it is logged.
_RECORDED_SETTINGS = {
    "dtype": "opd.teacher.dtype",
    "kl_coef": "opd.kl_coef",
    "discount": "opd.discount",
    "task_reward_coef": "opd.task_reward_coef",
}
_STEP_FOLDER = re.compile(r"global_step_(\d+)")


def sampled_ranges(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` byte ranges of a weight file of ``size`` bytes that the fingerprint reads.

    The first :data:`HEAD_BYTES` (a safetensors header, i.e. every tensor's name, dtype,
    shape and offset, fits in it for shards of real models), then :data:`RANGE_COUNT` ranges of
    :data:`RANGE_BYTES` evenly spaced up to the file's end. A file no larger than that is read whole.
    """
    if size <= HEAD_BYTES + RANGE_COUNT * RANGE_BYTES:
        return [(0, size)]
    span = size - HEAD_BYTES - RANGE_BYTES
    return [(0, HEAD_BYTES)] + [(HEAD_BYTES + i * span // (RANGE_COUNT - 1), RANGE_BYTES) for i in range(RANGE_COUNT)]


def teacher_fingerprint(model_path: str, scheme: int = FINGERPRINT_SCHEME) -> str:
    """sha256 over the teacher's config/tokenizer files in full and samples of its weight files' bytes.

    Scheme 2 (the default) hashes, per ``*.safetensors``/``*.bin`` file, its name, its size and
    the :func:`sampled_ranges`: at most 9 MiB in 129 reads per file. Cost, measured on a 2-core
    CPU box: 14 sparse shards of 5 GiB (a 70 GB teacher, no disk I/O) = 126 MiB hashed in 0.19 s
    (sha256 at about 1.5 GB/s); from a cold disk add the time of 1,806 small reads (not measured
    here: milliseconds each at most on an SSD, more on a network file system). Reading every byte
    instead would move 70 GB at every resume.

    Detects: another model, a retrained or fine-tuned teacher of the same shape (training changes
    nearly every tensor, so every sampled range), a truncated or resized file, any change to the
    config/tokenizer files. Does not detect: a change confined to bytes outside all sampled ranges
    of a file larger than 9 MiB (e.g. one edited bias vector between two samples; ranges are about
    1/128 of a file apart), or a change in files other than the weights and the three files above.
    Scheme 1 (weight-file names and sizes only) is kept to check checkpoints recorded with it.
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        full = os.path.join(model_path, name)
        if name in _FINGERPRINTED:
            with open(full, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
        elif name.endswith(_WEIGHT_SUFFIXES):
            size = os.path.getsize(full)
            digest.update(f"{name}:{size}".encode())
            if scheme >= 2:
                with open(full, "rb") as f:
                    for offset, length in sampled_ranges(size):
                        f.seek(offset)
                        digest.update(f.read(length))
    return digest.hexdigest()


def _settings(opd: OPDConfig) -> dict[str, Any]:
    """The OPD settings a checkpoint records, read from ``opd`` along the keys of :data:`_RECORDED_SETTINGS`."""
    return {name: functools.reduce(getattr, key.split(".")[1:], opd) for name, key in _RECORDED_SETTINGS.items()}


def teacher_identity(opd: OPDConfig) -> dict[str, Any]:
    """What a checkpoint records about its teacher, or (``opd.teachers``) about each teacher by name.

    Several teachers: ``teachers`` maps each name to its ``model_path``, ``fingerprint``, ``data_sources``
    and ``kl_coef``; ``teacher_field`` is recorded beside them.
    """
    if not opd.teachers:
        path = os.path.abspath(opd.teacher.model_path)
        return {
            "model_path": path,
            "fingerprint_scheme": FINGERPRINT_SCHEME,
            "fingerprint": teacher_fingerprint(path),
            **_settings(opd),
        }
    teachers = {}
    for name, teacher in opd.teachers.items():
        path = os.path.abspath(teacher.model_path)
        teachers[name] = {
            "model_path": path,
            "fingerprint": teacher_fingerprint(path),
            "data_sources": list(teacher.data_sources),
            "kl_coef": teacher.kl_coef,
        }
    return {
        "fingerprint_scheme": FINGERPRINT_SCHEME,
        "teachers": teachers,
        "teacher_field": opd.teacher_field,
        **_settings(opd),
    }


def write_teacher_identity(step_dir: str, identity: dict[str, Any]) -> str:
    """Write ``identity`` (:func:`teacher_identity`) as :data:`IDENTITY_FILE` into one ``global_step_N`` folder.

    The caller computes the identity once, when the teacher is loaded: it describes the weights the run
    trains against, and every save then costs a small JSON write instead of re-reading the teacher's files.
    """
    os.makedirs(step_dir, exist_ok=True)
    path = os.path.join(step_dir, IDENTITY_FILE)
    with open(path, "w") as f:
        json.dump(identity, f, indent=2)
    return path


def _resume_folder(config: DictConfig) -> str | None:
    """The checkpoint folder verl will resume from, found the way verl finds it."""
    mode = config.trainer.resume_mode
    if mode == "disable":
        return None
    if mode == "resume_path":
        return os.path.abspath(str(config.trainer.resume_from_path))
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    return find_latest_ckpt_path(os.path.abspath(str(config.trainer.default_local_dir)))


def _file_problem(path: str) -> str | None:
    """Why a checkpoint file cannot be loaded, from its structure alone (no tensor is read)."""
    if path.endswith(".pt"):
        # torch.save writes a zip archive whose directory sits at the end: a truncated file has none.
        try:
            with zipfile.ZipFile(path):
                return None
        except (zipfile.BadZipFile, OSError) as error:
            return f"not a complete torch.save archive: {error}"
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        # safe_open checks that the header parses and that the tensors it lists cover the file exactly.
        try:
            with safe_open(path, "np"):
                return None
        except (SafetensorError, OSError) as error:
            return f"not a complete safetensors file: {error}"
    return None


def _corrupted_files(step_dir: str) -> list[str]:
    """``path (reason)`` for each damaged ``*.pt``/``*.safetensors`` file under a checkpoint folder."""
    found = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            problem = _file_problem(path)
            if problem:
                found.append(f"{path} ({problem})")
    return found


def _previous_good_step(step_dir: str) -> str | None:
    """The newest ``global_step_M`` beside ``step_dir`` with ``M`` smaller, a student and no damaged file."""
    parent, name = os.path.split(os.path.normpath(step_dir))
    current = _STEP_FOLDER.fullmatch(name)
    if current is None or not os.path.isdir(parent):
        return None
    earlier = []
    for entry in os.listdir(parent):
        match = _STEP_FOLDER.fullmatch(entry)
        if match and int(match[1]) < int(current[1]):
            earlier.append((int(match[1]), os.path.join(parent, entry)))
    for _, folder in sorted(earlier, reverse=True):
        actor = os.path.join(folder, "actor")
        if os.path.isdir(actor) and os.listdir(actor) and not _corrupted_files(folder):
            return folder
    return None


def _ways_out(step_dir: str) -> str:
    """The overrides that resume from the previous intact step, or start fresh; nothing is deleted."""
    previous = _previous_good_step(step_dir)
    fresh = "start fresh with trainer.resume_mode=disable or a new trainer.default_local_dir"
    if previous is None:
        return f"No earlier intact checkpoint was found beside it: {fresh}. No file was changed."
    return (
        f"Resume from the previous intact checkpoint with trainer.resume_mode=resume_path "
        f"trainer.resume_from_path={previous}, or {fresh}. No file was changed."
    )


def _identity_problem(step_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """The teacher record of a checkpoint folder (``None`` when it has none), or why it cannot be used."""
    path = os.path.join(step_dir, IDENTITY_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"its teacher record {path} is damaged (not valid JSON: {error})"
    if not isinstance(recorded, dict):
        return None, f"its teacher record {path} is damaged (not a JSON object)"
    records = _teacher_set(recorded)
    if not isinstance(records, dict) or not records or not all(isinstance(r, dict) for r in records.values()):
        return None, f"its teacher record {path} is damaged (teachers is not a mapping of names to records)"
    for record in records.values():
        missing = [key for key in ("model_path", "fingerprint") if not isinstance(record.get(key), str)]
        if missing:
            return None, f"its teacher record {path} is damaged (no {' or '.join(missing)} in it)"
    scheme = recorded.get("fingerprint_scheme", 1)
    if scheme not in _KNOWN_SCHEMES:
        return None, (
            f"its teacher record {path} uses fingerprint scheme {scheme!r}, which this verl-opd does not know "
            f"(it knows {list(_KNOWN_SCHEMES)}; upgrade verl-opd)"
        )
    return recorded, None


def _warn_changed_settings(step_dir: str, recorded: dict[str, Any], opd: OPDConfig) -> None:
    current = _settings(opd)
    for name, key in _RECORDED_SETTINGS.items():
        if name in recorded and recorded[name] != current[name]:
            logger.warning(
                "verl-opd: resuming %s with %s changed: %s -> %s (the training target changes from this step on)",
                step_dir,
                key,
                recorded[name],
                current[name],
            )


def _refuse_or_warn(opd: OPDConfig, message: str) -> None:
    """Raise ``message`` unless the user switches teachers on purpose (then it is only logged)."""
    if not opd.allow_teacher_change:
        raise OPDConfigError(message)
    logger.warning("verl-opd: opd.allow_teacher_change=True: %s", message)


def check_resume_teacher(config: DictConfig, opd: OPDConfig) -> None:
    """Refuse to resume a damaged checkpoint, or one that was distilled from another teacher."""
    folder = _resume_folder(config)
    if folder is None:
        return
    corrupted = _corrupted_files(folder)
    if corrupted:
        raise OPDConfigError(
            f"Refusing to resume {folder}: {'; '.join(corrupted)}. Loading it would fail inside the run "
            f"(a save that was cut short?). {_ways_out(folder)}"
        )
    recorded, problem = _identity_problem(folder)
    if problem:
        _refuse_or_warn(
            opd,
            f"Refusing to resume {folder}: {problem}, so the teacher it was distilled from cannot be checked. "
            f"{_ways_out(folder)} Or, if this run's opd.teacher.model_path is that teacher, set "
            "opd.allow_teacher_change=True to resume without comparing teachers.",
        )
        return
    if recorded is None:
        logger.warning("verl-opd: resuming %s, which records no OPD teacher (not an OPD checkpoint?)", folder)
        return
    scheme = recorded.get("fingerprint_scheme", 1)
    if scheme < FINGERPRINT_SCHEME:
        logger.warning(
            "verl-opd: %s records a scheme-%s teacher fingerprint (weight-file names and sizes only): a retrained "
            "teacher of the same shape passes it. Checkpoints saved from now on record scheme %s.",
            folder,
            scheme,
            FINGERPRINT_SCHEME,
        )
    if opd.teachers or "teachers" in recorded:
        _check_teacher_set(folder, recorded, opd, scheme)
        _warn_changed_settings(folder, recorded, opd)
        return
    path = os.path.abspath(opd.teacher.model_path)
    fingerprint = teacher_fingerprint(path, scheme)
    if recorded["fingerprint"] != fingerprint:
        _refuse_or_warn(
            opd,
            f"Refusing to resume {folder}: it was distilled from teacher {recorded['model_path']} "
            f"(fingerprint {recorded['fingerprint'][:12]}), but this run's teacher is {path} "
            f"(fingerprint {fingerprint[:12]}). Resume with the same opd.teacher.model_path, start in a "
            "new trainer.default_local_dir, or set opd.allow_teacher_change=True to switch teachers on purpose.",
        )
    elif recorded["model_path"] != path:
        logger.warning("verl-opd: the teacher moved (%s -> %s), same fingerprint", recorded["model_path"], path)
    _warn_changed_settings(folder, recorded, opd)


def _teacher_set(recorded: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A record's teachers by name; a one-teacher record (``opd.teacher``) is the set ``{"teacher": ...}``."""
    return recorded.get("teachers", {"teacher": recorded})


def _check_teacher_set(folder: str, recorded: dict[str, Any], opd: OPDConfig, scheme: int) -> None:
    """Refuse a resume whose teachers differ from the checkpoint's: a name added or dropped, or other weights.

    A teacher that moved (same fingerprint) is logged; changed ``data_sources`` or ``kl_coef`` are logged as a
    change of the training target, like the global settings (:func:`_warn_changed_settings`).
    """
    before = _teacher_set(recorded)
    now = {name: teacher for name, _, teacher in opd.teacher_list()}
    changes = []
    if set(before) != set(now):
        changes.append(f"teachers {sorted(before)} -> {sorted(now)}")
    for name in sorted(set(before) & set(now)):
        path = os.path.abspath(now[name].model_path)
        fingerprint = teacher_fingerprint(path, scheme)
        if before[name]["fingerprint"] != fingerprint:
            changes.append(
                f"teacher {name!r}: {before[name]['model_path']} (fingerprint {before[name]['fingerprint'][:12]}) -> "
                f"{path} (fingerprint {fingerprint[:12]})"
            )
            continue
        if before[name]["model_path"] != path:
            logger.warning(
                "verl-opd: teacher %r moved (%s -> %s), same fingerprint", name, before[name]["model_path"], path
            )
        for key in ("data_sources", "kl_coef"):
            if key in before[name] and before[name][key] != getattr(now[name], key, None):
                logger.warning(
                    "verl-opd: resuming %s with opd.teachers.%s.%s changed: %s -> %s (the training target changes "
                    "from this step on)",
                    folder,
                    name,
                    key,
                    before[name][key],
                    getattr(now[name], key, None),
                )
    if changes:
        _refuse_or_warn(
            opd,
            f"Refusing to resume {folder}: it was distilled from other teachers ({'; '.join(changes)}). Resume with "
            "the same opd.teachers (or opd.teacher), start in a new trainer.default_local_dir, or set "
            "opd.allow_teacher_change=True to switch teachers on purpose.",
        )
