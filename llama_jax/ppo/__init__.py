"""PPO (Llama 2 paper, Sec. 3.2.3; Huang et al. 2024): ``step`` (pure experience processing and
train step), ``rollout`` (jitted functions of one mesh, prompts, rewards, held-out selection),
``run`` (the stage on the skeleton)."""
