"""Ghost Attention (GAtt, Llama 2 Sec. 3.3): a system instruction that holds over many turns."""
