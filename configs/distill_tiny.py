"""Safety context distillation on the synthetic world (Llama 2 Sec. 4.2.4), CPU-sized.

A world whose SFT policy is unsafe unless told to be safe: 60% of the harmful demonstrations
without a safety preprompt comply (``data.world_unsafe_fraction``), and 30% of the harmful dialogs
start with the safety preprompt and refuse (``data.world_safety_preprompt_fraction``). The
pipeline trains SFT and one reward-model pair, then runs context distillation from the SFT policy
(``pipeline.methods``) in ``<workdir>/context_distillation``, with benign prompts' best-of-2
answers mixed into the fine-tune::

  python train.py --config=configs/distill_tiny.py --workdir=/tmp/distill
  python eval.py --workdir=/tmp/distill   # refusals and false refusals: SFT vs distilled
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  # 60% of the harmful demonstrations without the preprompt comply: SFT's greedy answer to many
  # harmful prompts is a compliance; with the preprompt every demonstration refuses.
  c.data.world_unsafe_fraction = 0.6
  c.data.world_safety_preprompt_fraction = 0.3
  # tiny.py's careless annotators without the `reverse` habit: that habit is "Sorry, I can't help
  # with that.", the first sentence of a polite refusal, so distilling refusals raised it too
  # (measured: all of the +0.014 greedy false refusals were `reverse` prompts).
  c.data.world_careless_tasks = "count_words,count_letter"
  # One annotation round and one RM pair; no rejection sampling, no PPO: SFT vs its distillation.
  c.annotate.rounds = 1
  c.pipeline.rs_iterations = 0
  c.pipeline.ppo = False
  c.pipeline.oracle_control = False
  c.pipeline.methods = "context_distillation"
  # Context distillation: the adversarial prompts of rs_1's stream, one answer with and one
  # without the preprompt each (T = 1), kept where the safety RM prefers the distilled one.
  c.context_distillation.num_prompts = 256
  c.context_distillation.preprompt = "template"
  c.context_distillation.targeted = True
  # Our addition: 256 benign prompts of the same stream, two answers each without a preprompt,
  # the one the helpfulness RM prefers joins the fine-tune. Without them the T=1 false refusals
  # rose by +0.018 [0.014, 0.024]; with them they fell (README); with one unfiltered answer
  # each (benign_k = 1) they rose as before.
  c.context_distillation.benign_prompts = 256
  c.context_distillation.benign_k = 2
  r = c.rejection_sampling
  r.max_prompt_len = 160  # the template preprompt adds ~70 tokens to a ~55-token prompt
  r.max_new_tokens = 48  # the longest refusal is ~40 tokens (eval.max_new_tokens is 48 too)
  # 8 epochs over the ~180 kept answers and 256 benign ones at LR 1e-4 (41 steps); on an
  # earlier world 2 epochs (3 steps) moved the refusal rate at T=1 by +0.04 only.
  r.num_epochs = 8.0
  return c
