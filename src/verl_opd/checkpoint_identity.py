"""Which teacher a student checkpoint was distilled from.

verl's checkpoints hold only the student. Resuming against another teacher would
silently change the training target halfway, so each OPD checkpoint records the
teacher's path and a fingerprint of its files, and a resume against a teacher with
another fingerprint is refused before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:
    from verl_opd.opd_config import OPDConfig

logger = logging.getLogger(__name__)

IDENTITY_FILE = "opd_teacher.json"
_FINGERPRINTED = ("config.json", "tokenizer.json", "tokenizer_config.json")


def teacher_fingerprint(model_path: str) -> str:
    """sha256 over the teacher's config/tokenizer files and its weight files' names and sizes.

    Hashing weight contents would read tens of GB for a large teacher; names and
    sizes plus the config catch a different model, and are cheap.
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        full = os.path.join(model_path, name)
        if name in _FINGERPRINTED:
            with open(full, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
        elif name.endswith((".safetensors", ".bin")):
            digest.update(f"{name}:{os.path.getsize(full)}".encode())
    return digest.hexdigest()


def teacher_identity(opd: OPDConfig) -> dict[str, Any]:
    """What a checkpoint records about its teacher."""
    path = os.path.abspath(opd.teacher.model_path)
    return {
        "model_path": path,
        "fingerprint": teacher_fingerprint(path),
        "dtype": opd.teacher.dtype,
        "kl_coef": opd.kl_coef,
        "discount": opd.discount,
        "task_reward_coef": opd.task_reward_coef,
    }


def write_teacher_identity(step_dir: str, opd: OPDConfig) -> str:
    """Write :data:`IDENTITY_FILE` into one ``global_step_N`` checkpoint folder."""
    os.makedirs(step_dir, exist_ok=True)
    path = os.path.join(step_dir, IDENTITY_FILE)
    with open(path, "w") as f:
        json.dump(teacher_identity(opd), f, indent=2)
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


def check_resume_teacher(config: DictConfig, opd: OPDConfig) -> None:
    """Refuse to resume a checkpoint that was distilled from another teacher."""
    folder = _resume_folder(config)
    if folder is None:
        return
    recorded_file = os.path.join(folder, IDENTITY_FILE)
    if not os.path.isfile(recorded_file):
        logger.warning("verl-opd: resuming %s, which records no OPD teacher (not an OPD checkpoint?)", folder)
        return
    with open(recorded_file) as f:
        recorded = json.load(f)
    current = teacher_identity(opd)
    if recorded["fingerprint"] != current["fingerprint"]:
        message = (
            f"Refusing to resume {folder}: it was distilled from teacher {recorded['model_path']} "
            f"(fingerprint {recorded['fingerprint'][:12]}), but this run's teacher is {current['model_path']} "
            f"(fingerprint {current['fingerprint'][:12]}). Resume with the same opd.teacher.model_path, start in a "
            "new trainer.default_local_dir, or set opd.allow_teacher_change=True to switch teachers on purpose."
        )
        if not opd.allow_teacher_change:
            raise ValueError(message)
        logger.warning("verl-opd: opd.allow_teacher_change=True: %s", message)
    elif recorded["model_path"] != current["model_path"]:
        logger.warning(
            "verl-opd: the teacher moved (%s -> %s), same fingerprint", recorded["model_path"], current["model_path"]
        )
