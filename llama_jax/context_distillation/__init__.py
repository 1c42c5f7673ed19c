"""Safety context distillation (Llama 2 Sec. 4.2.4): ``step`` (the safety preprompt of a prompt,
the targeted selection of distilled answers) and ``run`` (the stage: sample with and without the
preprompt, keep, fine-tune without it)."""
