#!/usr/bin/env bash
# On-policy distillation from a larger teacher: Qwen3-32B teaches Qwen3-8B-Base (or an SFT checkpoint of it).
# One node, 8 GPUs (80 GB class), vLLM rollout of the 8B student, FSDP training.
#
# The 32B teacher lives in verl's reference slot and never runs in vLLM: it only scores the student's samples.
#   opd.precision=bf16
#       both models compute in bf16 (FlashAttention, bf16 matmul speed), their LM heads in fp32: both
#       log-probs come from fp32 logits (OPD_QUICKSTART.md section 6). Not yet run on a GPU.
#   opd.teacher.dtype=bfloat16
#       stores the teacher in bf16 (verl-opd sets actor_rollout_ref.ref.fsdp_config.model_dtype=bf16):
#       64 GB of weights instead of 128 GB in fp32.
#   opd.teacher.offload=True
#       verl's reference-model placement: the teacher's shards sit in pinned host memory (~8 GB per rank
#       here) and are streamed to the GPU at every forward. Saves GPU memory for vLLM's KV cache and the
#       student's activations, costs a host-to-GPU copy of the teacher per log-prob pass (slower).
#       opd.teacher.offload=False keeps it resident (~8 GB per GPU in bf16) and is faster when it fits.
#
# Before the first run:
#   hf download Qwen/Qwen3-32B     --local-dir ~/models/Qwen3-32B
#   hf download Qwen/Qwen3-8B-Base --local-dir ~/models/Qwen3-8B-Base
#   python verify_opd_implementation.py --student ~/models/Qwen3-8B-Base --teacher ~/models/Qwen3-32B \
#       actor_rollout_ref.rollout.name=vllm
#
# Environment (defaults in brackets): STUDENT_MODEL [~/models/Qwen3-8B-Base], TEACHER_MODEL [~/models/Qwen3-32B],
# TRAIN_FILES / VAL_FILES [~/data/gsm8k/{train,test}.parquet], NNODES [1], GPUS_PER_NODE [8],
# ROLLOUT_TP [2], MAX_RESPONSE_LENGTH [4096], STEPS [150], TEACHER_OFFLOAD [True], LOGGER [[console,wandb]].
# Extra Hydra overrides are passed through: bash examples/run_qwen3-32b_to_8b_opd.sh opd.teacher.offload=False
set -euo pipefail

python3 -m verl.trainer.main_ppo --config-name=opd_trainer \
    algorithm.adv_estimator=opd \
    opd.teacher.model_path="${TEACHER_MODEL:-$HOME/models/Qwen3-32B}" \
    opd.precision=bf16 \
    opd.teacher.dtype=bfloat16 \
    opd.teacher.offload="${TEACHER_OFFLOAD:-True}" \
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
    trainer.experiment_name=qwen3-8b-base-from-qwen3-32b \
    "$@"
