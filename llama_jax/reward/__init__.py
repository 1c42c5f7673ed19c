"""Reward models (Llama 2 paper, Sec. 3.2.2): ``step`` (ranking loss with margin, safety
auxiliary loss, pure), ``data`` (preference mixtures, checked), ``run`` (the stage),
``evaluate`` (held-out accuracy tables), ``scoring`` (RM or oracle rewards of dialogs, used by
rejection sampling, PPO and evaluation)."""
