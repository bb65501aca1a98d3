#!/usr/bin/env bash
# On-policy distillation at the scale of Thinking Machines' "On-Policy Distillation" (2025):
# the post-trained Qwen3-8B teaches Qwen3-8B-Base (ideally an SFT checkpoint of it, as in the blog).
# One node, 8 GPUs (80 GB class), vLLM rollout, FSDP training; the teacher runs in verl's
# reference slot (FSDP, resident on the GPUs, fp32 weights), so it needs no extra GPUs.
# opd.precision=bf16: both models compute in bf16 (FlashAttention, bf16 matmul speed) and their LM heads in
# fp32, so both log-probs come from fp32 logits (OPD_QUICKSTART.md section 6). Not yet run on a GPU.
#
#   64 prompts x 4 samples per step, discount 0 (per-token reverse KL), no KL loss, lr 1e-6.
#
# Before the first run:
#   hf download Qwen/Qwen3-8B      --local-dir ~/models/Qwen3-8B        # opd.teacher.model_path must be local
#   hf download Qwen/Qwen3-8B-Base --local-dir ~/models/Qwen3-8B-Base
#   python verify_opd_implementation.py --student ~/models/Qwen3-8B-Base --teacher ~/models/Qwen3-8B \
#       actor_rollout_ref.rollout.name=vllm   # or: verl-opd doctor ...; checks tokenizers + config, no GPU
# If the doctor reports different special tokens or chat templates (a base checkpoint can ship another eos
# token than the post-trained one), save the student with the teacher's tokenizer files first.
#
# Data: parquet files in verl's RL schema (chat-message `prompt`, `data_source`, `reward_model.ground_truth`),
# e.g. from verl's examples/data_preprocess/gsm8k.py. The task reward is only logged (opd.task_reward_coef=0).
#
# Environment (defaults in brackets): STUDENT_MODEL [~/models/Qwen3-8B-Base], TEACHER_MODEL [~/models/Qwen3-8B],
# TRAIN_FILES / VAL_FILES [~/data/gsm8k/{train,test}.parquet], NNODES [1], GPUS_PER_NODE [8],
# ROLLOUT_TP [2], MAX_RESPONSE_LENGTH [4096], STEPS [150], LOGGER [[console,wandb]].
# Extra Hydra overrides are passed through: bash examples/run_qwen3-8b_opd.sh trainer.save_freq=25
set -euo pipefail

python3 -m verl.trainer.main_ppo --config-name=opd_trainer \
    algorithm.adv_estimator=opd \
    opd.teacher.model_path="${TEACHER_MODEL:-$HOME/models/Qwen3-8B}" \
    opd.precision=bf16 \
    opd.teacher.dtype=float32 \
    opd.teacher.offload=False \
    opd.kl_coef=1.0 \
    opd.discount=0.0 \
    opd.task_reward_coef=0.0 \
    data.train_files="${TRAIN_FILES:-$HOME/data/gsm8k/train.parquet}" \
    data.val_files="${VAL_FILES:-$HOME/data/gsm8k/test.parquet}" \
    data.train_batch_size=64 \
    data.max_prompt_length=1024 \
    data.max_response_length="${MAX_RESPONSE_LENGTH:-4096}" \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="${STUDENT_MODEL:-$HOME/models/Qwen3-8B-Base}" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.weight_decay=0.0 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.ref.strategy=fsdp2 \
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=16384 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.tensor_model_parallel_size="${ROLLOUT_TP:-2}" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=16384 \
    trainer.n_gpus_per_node="${GPUS_PER_NODE:-8}" \
    trainer.nnodes="${NNODES:-1}" \
    trainer.total_training_steps="${STEPS:-150}" \
    trainer.val_before_train=True \
    trainer.test_freq=10 \
    trainer.save_freq=50 \
    trainer.logger="${LOGGER:-[console,wandb]}" \
    trainer.project_name=verl-opd \
    trainer.experiment_name=qwen3-8b-base-from-qwen3-8b \
    "$@"
