"""Rejection-sampling fine-tuning (Llama 2 paper, Sec. 3.2.3, Fig. 7-8): ``step`` (best-of-K
selection, pooling, records, reward-vs-N/temperature curves) and ``run`` (the stage)."""
