"""PPO of Llama-2-Chat 7B with the paper's settings (Llama 2, Sec. 3.2.3), on 1 node x 8 GPUs.

Run on top of the last rejection-sampled checkpoint, with the two reward models::

  python train.py --config=configs/ppo_7b.py --workdir=/ckpt/ppo_7b \\
      --config.init_from=/ckpt/rs_4/final --config.ppo.help_rm=/ckpt/rm_help/final \\
      --config.ppo.safety_rm=/ckpt/rm_safety/final

Memory plan of one PPO minibatch step and the rollouts (``llama_jax.ppo.run.PPOStage.abstract_steps``)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python train.py --config=configs/ppo_7b.py --dry_run
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "ppo"
  # The policy to optimize (the last rejection-sampled checkpoint); pi_0 = the same, frozen.
  c.init_from = ""
  # Llama 2 7B in bf16 compute with f32 master params; scan + minimal remat as SFT 7B.
  c.model.preset = "llama2_7b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat = "minimal"
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"
  # Prompts: HH-RLHF (safety prompts) + Self-Instruct, the public stand-ins of the paper's.
  c.data.sft_sources = "hh_rlhf,self_instruct"
  # AdamW b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1, clip 1.0 (paper), constant LR below.
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.95, 1e-5
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0
  # Reward models (set on the command line).
  c.ppo.help_rm = ""
  c.ppo.safety_rm = ""
  # Value model initialized from the helpfulness RM ("" = help_rm).
  c.ppo.value_from = ""
  # 200-400 iterations with early stopping on held-out prompts.
  c.ppo.num_iterations = 400
  # Batch 512 prompts, minibatch 64, one gradient step per minibatch, clip 0.2.
  c.ppo.batch_size = 512
  c.ppo.minibatch_size = 64
  c.ppo.epochs = 1
  c.ppo.clip_eps = 0.2
  # beta 0.01 for 7B and 13B; k1 KL estimator in the reward (k3 selectable).
  c.ppo.beta = 0.01
  c.ppo.kl_estimator = "k1"
  # Rc cut 0.15 (precision 0.89 / recall 0.55 on Meta's safety set).
  c.ppo.safety_threshold = 0.15
  # Constant LR 1e-6 for the policy and the value model.
  c.ppo.lr = 1e-6
  c.ppo.value_lr = 1e-6
  # Rollouts: prompts up to 1024 tokens, responses up to 1024 (our choice: the paper gives none).
  c.ppo.max_prompt_len = 1024
  c.ppo.max_new_tokens = 1024
  c.ppo.temperature = 1.0
  # EOS trick: -1 whitened units for completions that do not end within the budget.
  c.ppo.eos_penalty = -1.0
  # Held-out evaluation every 10 iterations on 256 prompts, stop after 3 without improvement.
  c.ppo.eval_every = 10
  c.ppo.eval_prompts = 256
  c.ppo.patience = 3
  c.ppo.checkpoint_every = 10
  c.ppo.num_prompts = 0
  c.train.keep_checkpoints = 2
  # One node, 8 GPUs, FSDP for training; rollouts are resharded to the generation layout
  # (tensor parallel over 'tensor', replicated over 'fsdp': use (1, 1, 8) rules for sampling).
  c.mesh.shape = (1, 8, 1)
  c.mesh.device_memory_gib = 80.0
  # Memory (docs/memory_plans.md): each minibatch of 64 (8 rows per device) in 8 microbatches;
  # the train state waits in host memory during rollouts; rollouts in 4 chunks of 128 (7B has
  # no GQA: the KV cache of all 512 x 2048 tokens would be 34 GiB per device).
  c.train.grad_accum_steps = 8
  c.ppo.offload_state = True
  c.ppo.generation_batch_size = 128
  # The scoring pass (reward models, reference, value) 128 rollouts per forward pass: all 512
  # at once plan 76 GiB per device at 7B (scoring_pass temporaries of 64 rows x 2048 tokens).
  c.ppo.forward_batch_size = 128
  return c
