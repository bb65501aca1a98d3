#!/usr/bin/env bash
# OPD end to end on a CPU-only machine with tiny hub-free models (about 1.5 min start-up, then a few
# seconds a step on 2 cores). Shows the mechanics, not a result: the teacher here is a randomly
# initialised, larger model (use `verl-opd demo` / `make demo` for a teacher that knows the task).
#
#   bash examples/run_tiny_opd_cpu.sh                     # 3 steps
#   OPD_STEPS=20 bash examples/run_tiny_opd_cpu.sh        # more steps
#   bash examples/run_tiny_opd_cpu.sh actor_rollout_ref.actor.optim.lr=1e-2   # extra overrides pass through
#
# Environment: OPD_STEPS [3], OPD_TINY_DIR [/tmp/verl-opd-tiny] (assets are built once and reused),
# PYTHON [python] (the interpreter with verl and verl-opd installed).
set -euo pipefail

PYTHON=${PYTHON:-python}
TINY=${OPD_TINY_DIR:-/tmp/verl-opd-tiny}
mkdir -p "$TINY" && TINY=$(cd "$TINY" && pwd)  # absolute: the paths below must not depend on the cwd

verl_opd() {  # the verl-opd CLI, also when the venv's bin/ is not on PATH
    if command -v verl-opd >/dev/null 2>&1; then verl-opd "$@"; else "$PYTHON" -m verl_opd.tools.cli "$@"; fi
}

if [ ! -f "$TINY/teacher/config.json" ] || [ ! -f "$TINY/data/train.parquet" ]; then
    verl_opd tiny tokenizer --out "$TINY/tokenizer"
    verl_opd tiny model --out "$TINY/student" --tokenizer "$TINY/tokenizer" --seed 0
    verl_opd tiny model --out "$TINY/teacher" --tokenizer "$TINY/tokenizer" --hidden-size 96 --num-layers 3 --seed 1
    verl_opd tiny data --out "$TINY/data"
fi

"$PYTHON" -m verl.trainer.main_ppo trainer.device=cpu algorithm.adv_estimator=opd \
    +opd.teacher.model_path="$TINY/teacher" \
    data.train_files="$TINY/data/train.parquet" \
    data.val_files="$TINY/data/test.parquet" \
    data.train_batch_size=4 \
    data.max_prompt_length=64 \
    data.max_response_length=16 \
    actor_rollout_ref.model.path="$TINY/student" \
    actor_rollout_ref.actor.ppo_mini_batch_size=4 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.optim.lr=1e-3 \
    actor_rollout_ref.rollout.n=1 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
    trainer.n_gpus_per_node=1 \
    trainer.nnodes=1 \
    trainer.total_training_steps="${OPD_STEPS:-3}" \
    trainer.logger=console \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.save_freq=-1 \
    trainer.project_name=verl-opd-tiny \
    trainer.experiment_name=cpu \
    "$@"
