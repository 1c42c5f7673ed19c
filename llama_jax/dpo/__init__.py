"""Direct Preference Optimization (Rafailov et al. 2023): ``step`` (sequence log-probs, the DPO
loss, the pure train step), ``reference`` (the SFT policy's log-probs, computed once and cached)
and ``run`` (the stage on the skeleton)."""
