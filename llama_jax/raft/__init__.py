"""RAFT, reward-ranked fine-tuning (Dong et al. 2023): ``step`` (local and global ranking of a
round's samples) and ``run`` (the stage: rounds of the rejection-sampling stage's sample -> rank
-> fine-tune, each from the policy of the round before)."""
