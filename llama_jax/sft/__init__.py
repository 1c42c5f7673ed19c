"""Supervised fine-tuning (Llama 2 paper, Sec. 3.1): ``step`` (pure, jittable) and ``run`` (the
stage on the skeleton)."""
