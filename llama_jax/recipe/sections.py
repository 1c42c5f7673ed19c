"""Typed stage sections of the config: ``config.tokenizer``, ``config.data``, ``config.mesh``,
``config.annotate``, ``config.reward``, ``config.dpo``, ``config.rrhf``, ``config.raft``,
``config.context_distillation``, ``config.gatt``, ``config.rejection_sampling``, ``config.ppo``
and ``config.pipeline`` as frozen dataclasses, each field with its default, meaning and bounds (the one place they live: ``configs/base.py`` builds
these sections with ``config_section``).

``recipe.stages.run`` reads each of them once before any stage starts (:data:`SECTIONS`,
through ``train.settings.validate``); they live above the stages because the PPO and reward
fields take their defaults and choices from ``ppo.step`` and ``reward.step``.
The bounds are what the stages reject anyway (a count >= 1, a share in [0, 1], one of a few
names); checks across fields or against files (divisibility, paths, the model's length, the
number of prompt streams a pipeline needs) stay with each stage. PPO's math fields take their
defaults from ``ppo.step.PPOConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from llama_jax.ppo.step import OLD_LOGPROBS, PPOConfig
from llama_jax.reward.step import MARGINS
from llama_jax.rl import KL_ESTIMATORS
from llama_jax.train.fields import _f

REWARD_KINDS = ("rm", "oracle")  # reward.scoring.REWARD_KINDS
_STREAM = "Train-prompt stream (data.prompt_streams; -1 = the whole split); set by the pipeline."


def _mesh_ok(shape: tuple) -> bool:
  return 0 not in shape and shape.count(-1) <= 1


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """``config.tokenizer``: the world's BPE tokenizer or a SentencePiece model."""

  path: str = _f("world", '"world" = train the synthetic world\'s small BPE tokenizer into '
                 "<workdir>/tokenizer.model; otherwise a path to a SentencePiece model (e.g. "
                 "../shared/data/llama2-tokenizer/tokenizer.model).")
  world_vocab_size: int = _f(512, "Vocabulary size of the world tokenizer (ignored for a path; "
                             "3 specials + 256 byte pieces at least).", lo=300)


@dataclasses.dataclass(frozen=True)
class Data:
  """``config.data``: SFT sources, the synthetic world, splits, packing and batch size."""

  sft_sources: str = _f("world", "SFT sources, comma-separated: world | hh_rlhf | "
                        "self_instruct | jsonl.")
  sft_weights: str = _f("", "Sampling weights of the sources above, comma-separated (\"\" = "
                        "proportional to their sizes).")
  hh_rlhf_path: str = _f("../shared/data/hh-rlhf/harmless-base-test.jsonl.gz",
                         "The official HH-RLHF *.jsonl.gz file (or its directory).")
  self_instruct_path: str = _f("../shared/data/self-instruct/seed_tasks.jsonl",
                               "Self-Instruct seed tasks JSONL.")
  sft_jsonl_path: str = _f("", "Generic JSONL of SFT dialogs (schema in the README).")
  heldout_fraction: float = _f(0.05, "Share of each real-data source held out for evaluation "
                               "(fixed-seed split).", lo=0.0, hi=1.0, lo_ok=False, hi_ok=False)
  split_seed: int = _f(1234, "Seed of the train/held-out split (kept separate from `seed` so "
                       "runs share a split).", lo=0)
  world_sft_examples: int = _f(4000, "Synthetic world: number of SFT demonstrations generated.",
                               lo=1)
  world_heldout_prompts: int = _f(200, "Synthetic world: number of held-out prompts generated.",
                                  lo=1)
  world_careless_fraction: float = _f(0.0, "Synthetic world: share of benign SFT demonstrations "
                                      "by careless annotators (non-answers and false refusals; "
                                      "world.WorldConfig.careless_fraction). 0 = all gold.",
                                      lo=0.0, hi=1.0)
  world_careless_tasks: str = _f("", "Synthetic world: benign task families (comma-separated, "
                                 'e.g. "count_words,reverse") whose demonstrations are mostly a '
                                 "careless annotator's habit (world.HABITS), a share "
                                 "world_careless_task_fraction of them.")
  world_careless_task_fraction: float = _f(0.6, "Share of the demonstrations of "
                                           "world_careless_tasks that are the habit.",
                                           lo=0.0, hi=1.0)
  world_unsafe_fraction: float = _f(0.0, "Synthetic world: share of harmful SFT demonstrations "
                                    "(without a safety preprompt) that comply "
                                    "(world.WorldConfig.unsafe_fraction). 0 = all refuse.",
                                    lo=0.0, hi=1.0)
  world_safety_preprompt_fraction: float = _f(0.0, "Synthetic world: share of harmful SFT "
                                              "dialogs that start with a safety preprompt and "
                                              "refuse (world.WorldConfig."
                                              "safety_preprompt_fraction; what context "
                                              "distillation distils).", lo=0.0, hi=1.0)
  world_instruction_fraction: float = _f(0.0, "Synthetic world: share of SFT dialogs that start "
                                         "with a system instruction (begin or end every answer "
                                         "with a word; world.INSTRUCTIONS) and follow it.",
                                         lo=0.0, hi=1.0)
  world_multiturn_fraction: float = _f(0.0, "Synthetic world: share of SFT dialogs with 2 .. "
                                       "world_max_turns benign exchanges (no instruction; what "
                                       "Ghost Attention builds on).", lo=0.0, hi=1.0)
  world_max_turns: int = _f(20, "Synthetic world: most exchanges of a multi-turn SFT dialog.",
                            lo=2)
  prompt_streams: int = _f(8, "Disjoint prompt streams of each split: stages that draw prompts "
                           "(annotation rounds, rejection-sampling iterations, PPO) take "
                           "different streams (their *.prompt_stream fields).", lo=1)
  max_seq_len: int = _f(256, "Packed sequence length of SFT batches (Llama 2 SFT: 4096).", lo=2)
  batch_size: int = _f(16, "Global batch size in packed sequences (Llama 2 SFT: 64).", lo=1)
  tfds_dir: str = _f("", 'Where TFDS builders write their array_record files ("" = '
                     "<workdir>/tfds).")
  preference_jsonl_path: str = _f("", "Generic JSONL of preference pairs (schema in "
                                  "llama_jax/data/sources.py), reward source "
                                  '"jsonl_preferences".')
  select: str = _f("all", "SFT train records to train on (llama_jax.data.coreset, each source "
                   'alone; held-out splits stay whole): "all" | "coreset" (K-means of model '
                   "embeddings, then greedy k-center from the cluster centres; Chen et al. 2023) "
                   '| "random" (a uniform subset of the same size, seeded by `seed`).',
                   choices=("all", "coreset", "random"))
  select_fraction: float = _f(1.0, "Share of each source's train records selected: "
                              "ceil(select_fraction * n).", lo=0.0, hi=1.0, lo_ok=False)
  select_clusters: int = _f(16, "K of the coreset's K-means (at most the selected count).", lo=1)
  select_embed_from: str = _f("", "Coreset: checkpoint (a final/ dir) whose mean-pooled final "
                              'hidden states embed the examples ("" = config.init_from; one of '
                              "them is required).")


@dataclasses.dataclass(frozen=True)
class Mesh:
  """``config.mesh``: the device mesh (``llama_jax.sharding``)."""

  shape: Tuple[int, ...] = _f((1, -1, 1), "Mesh shape over (data, fsdp, tensor); -1 = the "
                              "remaining devices.", lo=-1, length=3,
                              rule=(_mesh_ok, "none 0 and at most one -1"))
  device_memory_gib: float = _f(80.0, "Memory per device for the --dry_run fit verdict, in GiB "
                                "(A100/H100: 80).", lo=0.0, lo_ok=False)


@dataclasses.dataclass(frozen=True)
class Annotate:
  """``config.annotate``: on-policy preference annotation (stage "annotate", Sec. 3.2.1;
  synthetic world only). K samples of the policy per train prompt, every pair of different
  oracle quality kept; generation lengths and batch size are rejection_sampling's."""

  num_prompts: int = _f(0, "Train prompts sampled (the pipeline annotates when > 0; the stage "
                        "needs >= 1).", lo=0)
  k: int = _f(4, "Samples per prompt (pairs of samples: >= 2).", lo=2)
  temperature: float = _f(1.0, "Sampling temperature.", lo=0.0, lo_ok=False)
  rounds: int = _f(1, "Pipeline: annotation rounds. 1 = once, on SFT samples; j > 1 adds a "
                   "round before rejection-sampling iteration j (or PPO) on the latest policy's "
                   "samples, pairs accumulated, RMs retrained.", lo=1)
  round: int = _f(1, "Set by the pipeline: this round's number (sampling key).", lo=1)
  accumulate_from: str = _f("", "Set by the pipeline: the previous round's pairs, copied into "
                            'this round\'s preferences.jsonl ("" = none).')
  prompt_stream: int = _f(-1, _STREAM, lo=-1)


@dataclasses.dataclass(frozen=True)
class Reward:
  """``config.reward``: reward models (stage "reward", Llama 2 Sec. 3.2.2)."""

  model: str = _f("helpfulness", "Which reward model this run trains: helpfulness | safety (a "
                  "label for logs and eval; the data mixture makes it one or the other).",
                  choices=("helpfulness", "safety"))
  sources: str = _f("world_helpfulness,world_safety", "Preference sources, comma-separated: "
                    "world_helpfulness | world_safety | hh_rlhf | jsonl_preferences. The first "
                    "is the primary set: an epoch is one pass over it.")
  weights: str = _f("1,1", 'Mixture weights of the sources, same order ("" = proportional to '
                    'their sizes); paper: helpfulness RM "1,1", safety RM "0.9,0.1".')
  margin: str = _f("small", "Margin table m(rating) of the ranking loss (Table 27); pairs "
                   "without a rating get margin 0.", choices=tuple(MARGINS))
  safety_aux_weight: float = _f(0.0, "Weight of the safety auxiliary loss (Appendix A.4, Table "
                                "29): BCE of sigmoid(r) against the pair's safety label. 0 = "
                                "off; the pipeline sets it for the safety RM.", lo=0.0)
  batch_size: int = _f(512, "Preference pairs per global batch (paper: 512); divisible by "
                       "processes and by train.grad_accum_steps.", lo=1)
  max_seq_len: int = _f(4096, "Row length of a response (prompt + response + EOS).", lo=2)
  overlong: str = _f("error", 'A pair longer than max_seq_len: "error" (rejected before step 0, '
                     'naming file and line) or "drop" (skipped, counted in data_stats.json).',
                     choices=("error", "drop"))
  world_train_pairs: int = _f(4000, "Synthetic world: train preference pairs per world source.",
                              lo=1)
  world_heldout_pairs: int = _f(400, "Synthetic world: held-out preference pairs per world "
                                "source.", lo=1)
  eval_pairs: int = _f(0, "Held-out pairs per source scored at each evaluation (0 = all).", lo=0)


@dataclasses.dataclass(frozen=True)
class DPO:
  """``config.dpo``: stage "dpo" (Rafailov et al. 2023): the SFT policy in ``init_from`` trained
  on a preference mixture (the reward section's sources) against itself as the reference. Steps:
  ``train.num_steps``, or ``train.num_epochs`` over the first source; LR and schedule:
  ``config.optimizer``."""

  beta: float = _f(0.1, "KL coefficient of the implicit reward beta * log(pi / pi_ref) (paper: "
                   "0.1).", lo=0.0, lo_ok=False)
  sources: str = _f("world_helpfulness,world_safety", "Preference sources, comma-separated: "
                    "world_helpfulness | world_safety | hh_rlhf | jsonl_preferences (e.g. the "
                    "on-policy annotation batches). The first is the primary set: an epoch is one "
                    "pass over it.")
  weights: str = _f("1,1", 'Mixture weights of the sources, same order ("" = proportional to '
                    "their sizes).")
  batch_size: int = _f(64, "Preference pairs per global batch (paper: 64); divisible by "
                       "processes and by train.grad_accum_steps.", lo=1)
  max_seq_len: int = _f(4096, "Row length of a response (prompt + response + EOS).", lo=2)
  overlong: str = _f("error", 'A pair longer than max_seq_len: "error" (rejected before step 0, '
                     'naming file and line) or "drop" (skipped, counted in data_stats.json).',
                     choices=("error", "drop"))
  world_train_pairs: int = _f(4000, "Synthetic world: train preference pairs per world source.",
                              lo=1)
  world_heldout_pairs: int = _f(400, "Synthetic world: held-out preference pairs per world "
                                "source.", lo=1)
  eval_pairs: int = _f(0, "Held-out pairs per source scored at each evaluation (0 = all).", lo=0)
  reference_batch_size: int = _f(0, "Pairs per call of the one-off reference pass (0 = the "
                                 "train microbatch, batch_size / train.grad_accum_steps).", lo=0)


@dataclasses.dataclass(frozen=True)
class RRHF:
  """``config.rrhf``: stage "rrhf" (Yuan et al. 2023): the policy in ``init_from`` trained to rank
  K scored responses per prompt like their rewards (a sampled-set JSONL, e.g. a
  rejection-sampling stage's ``sampled.jsonl``) plus cross-entropy on the best one. Prompts are
  held out by ``data.heldout_fraction`` / ``data.split_seed``. Steps: ``train.num_steps``, or
  ``train.num_epochs`` over the train prompts; LR: ``config.optimizer``."""

  sampled: str = _f("", "Sampled-set JSONL files (rejection_sampling.step's records: prompt, "
                    "samples, scores, finished), comma-separated: the candidates and their "
                    "rewards. Truncated samples (finished false) are left out.")
  k: int = _f(8, "Candidates per prompt in a batch: a prompt with more keeps its first k, one "
              "with fewer is padded with masked rows.", lo=2)
  batch_size: int = _f(16, "Prompts per global batch (each expands to k rows); divisible by "
                       "processes and by train.grad_accum_steps.", lo=1)
  max_seq_len: int = _f(4096, "Row length of a candidate (prompt + response + EOS).", lo=2)
  overlong: str = _f("drop", 'A candidate longer than max_seq_len: "drop" (left out, counted in '
                     'data_stats.json) or "error" (rejected before step 0, naming file and '
                     'line).', choices=("error", "drop"))
  rank_weight: float = _f(1.0, "Weight of the ranking loss against the cross-entropy on the "
                          "best response (RRHF's rrhf_weight; paper: 1).", lo=0.0)
  length_penalty: float = _f(1.0, "p_i = sum of log-probs / length**length_penalty (paper: 1, "
                             "the mean log-prob).", lo=0.0)


@dataclasses.dataclass(frozen=True)
class RAFT:
  """``config.raft``: stage "raft" (Dong et al. 2023): rounds of reward-ranked fine-tuning.
  Each round samples ``rejection_sampling.k`` responses for ``rejection_sampling.num_prompts``
  new prompts (no prompt in two rounds) from the current policy, ranks them by the reward
  (``rejection_sampling.reward``), keeps the top share and fine-tunes on it
  (``rejection_sampling.lr`` / ``num_epochs`` / ``num_steps``): the rejection-sampling stage's
  machinery, online per batch, without pooling (``sample_from``, ``pool_from`` empty and
  ``auto_temperature`` False, or the stage refuses the config)."""

  num_rounds: int = _f(4, "Rounds of sample -> rank -> fine-tune, each from the previous "
                       "round's policy.", lo=1)
  keep_fraction: float = _f(0.0, "Global ranking: keep this top share of all the round's "
                            "num_prompts x k samples, floor(keep_fraction x num_prompts x k) >= 1 "
                            "of them (0 = local ranking: the best sample of each prompt, the "
                            "paper's default). Truncated samples are never kept.", lo=0.0, hi=1.0)
  kl_coef: float = _f(0.0, "Rank by the KL-regularized reward r - kl_coef * log(pi_r(y) / "
                      "pi_0(y)) (summed over the response's tokens; pi_r the round's policy, pi_0 "
                      "init_from) instead of r (0 = the paper's ranking by r). Rounds after the "
                      "first score their samples under both models once.", lo=0.0)


@dataclasses.dataclass(frozen=True)
class ContextDistillation:
  """``config.context_distillation``: stage "context_distillation" (Llama 2 Sec. 4.2.4): answers
  to adversarial prompts sampled with a safety preprompt, kept (targeted: where the safety RM
  scores them above the answer without it), and fine-tuned on without the preprompt. Sampling,
  the reward and the fine-tune use ``rejection_sampling``'s fields (``temperature``, ``top_p``,
  ``max_new_tokens``, ``max_prompt_len``, ``batch_size``; ``reward``, ``help_rm``,
  ``safety_rm``; ``lr``, ``num_epochs``, ``num_steps``, ``warmup_frac``)."""

  num_prompts: int = _f(256, "Distinct adversarial (safety) train prompts distilled.", lo=1)
  preprompt: str = _f("generic", '"generic" (world_tasks.SAFETY_PREPROMPT) | "template" (followed '
                      "by the prompt's risk category's answer template; synthetic world only).",
                      choices=("generic", "template"))
  targeted: bool = _f(True, "Keep a distilled answer only where the reward (the safety RM on "
                      "safety prompts) scores it above the original answer; False = every "
                      "finished one.")
  benign_prompts: int = _f(0, "Benign (not is_safety) train prompts of the same stream whose "
                          "own answers, without a preprompt, join the fine-tune, so that "
                          "distilling refusals does not teach refusing benign prompts (our "
                          "addition; 0 = the paper's adversarial prompts only).", lo=0)
  benign_k: int = _f(2, "Answers sampled per benign prompt; the finished one the reward (Rc: "
                     "the helpfulness RM's score on a benign prompt) rates highest is kept "
                     "(best-of-k, as rejection sampling picks; 1 = the policy's own answer).",
                     lo=1)
  prompt_stream: int = _f(-1, _STREAM, lo=-1)


@dataclasses.dataclass(frozen=True)
class GAtt:
  """``config.gatt``: stage "gatt", Ghost Attention (Llama 2 Sec. 3.3): multi-turn dialogs with
  a system instruction concatenated to every user turn are sampled from the policy, then
  fine-tuned on with the instruction in the first turn only and the loss on the last answer only.
  On the synthetic world the instructions are checkable; on file data they are Llama 2's
  synthetic constraints over the prompts of ``data.sft_sources``, with ``keep="finished"`` and
  no evaluation. Sampling uses ``rejection_sampling``'s ``temperature``, ``max_new_tokens`` and
  ``batch_size``; the fine-tune its ``lr``, ``num_epochs``, ``num_steps`` and ``warmup_frac``."""

  num_dialogs: int = _f(512, "Train dialogs sampled, one training sample each.", lo=1)
  max_turns: int = _f(20, "Turns of a sampled dialog, drawn uniformly from [1, max_turns] "
                      "(the paper: up to 20, until the context is full).", lo=1)
  keep: str = _f("following", "Which sampled dialogs become training samples (every answer "
                 'finished in all modes): "finished" | "following" (the last answer follows the '
                 'instruction, the world\'s checker) | "following_correct" (and the world oracle '
                 "judges it helpful: a stand-in for the paper's sampling from its best RLHF "
                 "model). Off the synthetic world only \"finished\".",
                 choices=("finished", "following", "following_correct"))
  eval_dialogs: int = _f(64, "Held-out dialogs of eval_turns turns on which the stage measures "
                         "adherence per turn of init_from and of its result (0 = no evaluation; "
                         "synthetic world only).",
                         lo=0)
  eval_turns: int = _f(20, "Turns of an evaluation dialog.", lo=1)
  late_turn: int = _f(10, "Adherence is also pooled over turns >= late_turn.", lo=1)
  prompt_stream: int = _f(-1, _STREAM, lo=-1)


@dataclasses.dataclass(frozen=True)
class RejectionSampling:
  """``config.rejection_sampling``: stage "rejection_sampling" (Llama 2 Sec. 3.2.3): K samples
  per prompt, the best by the reward pooled with earlier iterations', fine-tuned on."""

  help_rm: str = _f("", "Helpfulness reward model (a reward.save_reward_model directory).")
  safety_rm: str = _f("", 'Safety reward model ("" = Rc = Rh).')
  sample_from: str = _f("", 'Checkpoint to sample from ("" = the policy in init_from); a larger '
                        "model's final/ distils its best samples into the policy.")
  iteration: int = _f(1, "This iteration's number (RLHF-V<iteration>), recorded in every "
                      "sampled record.", lo=1)
  pool_from: str = _f("", "Sampled-set JSONL files of earlier iterations, comma-separated: "
                      "their best samples are pooled with this iteration's.")
  num_prompts: int = _f(512, "Prompts sampled per iteration.", lo=1)
  k: int = _f(8, "Samples per prompt (K).", lo=1)
  temperature: float = _f(1.0, "Sampling temperature.", lo=0.0, lo_ok=False)
  top_p: float = _f(1.0, "Nucleus sampling share.", lo=0.0, hi=1.0, lo_ok=False)
  max_new_tokens: int = _f(64, "Token budget of a sample.", lo=1)
  max_prompt_len: int = _f(192, "Longest prompt in tokens (longer prompts are skipped, counted "
                           "in data_stats.json).", lo=1)
  batch_size: int = _f(16, "Prompts per generation batch (each expands to batch_size * k rows).",
                       lo=1)
  safety_threshold: float = _f(0.15, "Rs cut of the combined reward (Llama 2: 0.15).",
                               lo=0.0, hi=1.0)
  reward: str = _f("rm", 'Reward that picks the best sample: "rm" (Rc of the reward models) | '
                   '"oracle" (the synthetic world\'s judge: the gold-reward control).',
                   choices=REWARD_KINDS)
  auto_temperature: bool = _f(False, "Sample at the temperature with the highest max-reward "
                              "point of this iteration's Fig. 8 curve instead of temperature.")
  prompt_stream: int = _f(-1, _STREAM, lo=-1)
  num_steps: int = _f(0, "Fine-tuning on the pooled best samples: optimizer steps (0 = "
                      "num_epochs passes).", lo=0)
  num_epochs: float = _f(1.0, "Fine-tuning epochs.", lo=0.0)
  lr: float = _f(1e-5, "Fine-tuning peak LR (cosine to 10%).", lo=0.0)
  warmup_frac: float = _f(0.0, "Warmup of the fine-tuning LR as a share of its steps.",
                          lo=0.0, hi=1.0)
  plot_prompts: int = _f(32, "Figures 7/8: prompts of the reward-vs-temperature curve (0 = "
                         "skip it).", lo=0)
  plot_temperatures: str = _f("0.6,0.8,1.0,1.2,1.4", "Temperatures of that curve, "
                              "comma-separated.")
  plot_k: int = _f(8, "K of the samples of that curve.", lo=1)


@dataclasses.dataclass(frozen=True)
class PPO:
  """``config.ppo``: stage "ppo" (Llama 2 Sec. 3.2.3, Huang et al. 2024); the math defaults are
  ``PPOConfig``'s (``llama_jax/ppo/step.py``)."""

  help_rm: str = _f("", "Frozen helpfulness reward model (a reward model directory).")
  safety_rm: str = _f("", 'Frozen safety reward model ("" = Rc = Rh).')
  value_from: str = _f("", 'Value model initialization ("" = help_rm, as Huang et al. 2024; a '
                       "policy checkpoint gets a new head).")
  value_head_init: str = _f("zero", '"zero" (V = 0 at start, on the scale of the whitened '
                            'returns) | "keep" (the RM head).', choices=("zero", "keep"))
  reward: str = _f("rm", '"rm" (the reward models\' Rc) | "oracle" (the synthetic world\'s '
                   "judge, the gold-reward control of Gao et al. 2022).", choices=REWARD_KINDS)
  sft_from: str = _f("", "SFT policy (final/ dir) for the held-out KL-to-SFT of every "
                     'evaluation ("" = not logged).')
  prompt_stream: int = _f(-1, _STREAM, lo=-1)
  num_iterations: int = _f(200, "PPO iterations (paper: 200-400, with early stopping).", lo=1)
  batch_size: int = _f(512, "Prompts (rollouts) per iteration (paper: 512).", lo=1)
  minibatch_size: int = _f(PPOConfig.minibatch_size, "Rollouts per gradient step (paper: 64).",
                           lo=1)
  epochs: int = _f(PPOConfig.epochs, "Passes over each rollout batch (paper: one gradient step "
                   "per minibatch).", lo=1)
  beta: float = _f(PPOConfig.beta, "KL coefficient (paper: 0.01 for 7B/13B, 0.005 for "
                   "34B/70B).", lo=0.0)
  kl_estimator: str = _f(PPOConfig.kl_estimator, "Per-token KL estimator of the penalty.",
                         choices=KL_ESTIMATORS)
  clip_eps: float = _f(PPOConfig.clip_eps, "Policy ratio clip.", lo=0.0, hi=1.0, lo_ok=False,
                       hi_ok=False)
  value_clip: float = _f(PPOConfig.value_clip, "Value clip range around the rollout values.",
                         lo=0.0, lo_ok=False)
  gamma: float = _f(PPOConfig.gamma, "GAE discount.", lo=0.0, hi=1.0)
  lam: float = _f(PPOConfig.lam, "GAE lambda.", lo=0.0, hi=1.0)
  generation_batch_size: int = _f(0, "Rollouts generated at a time (0 = the whole batch): "
                                   "smaller chunks hold a smaller KV cache; chunk i samples "
                                   "with fold_in(key, i). Divides batch_size; a multiple of "
                                   "data x fsdp.", lo=0)
  forward_batch_size: int = _f(PPOConfig.forward_batch_size, "Rollouts per forward pass of "
                                "the scoring pass (reward models, reference, value; 0 = the "
                                "whole batch at once): smaller chunks hold fewer activations. "
                                "Divides batch_size; a multiple of data x fsdp.", lo=0)
  offload_state: bool = _f(False, "During rollouts park the train state (policy and value "
                           "params and their AdamW state) in host memory (jax memory kind "
                           "pinned_host) and bring it back for scoring and the update: its "
                           "device memory goes to generation (70B: 24 GiB per device).")
  old_logprobs: str = _f(PPOConfig.old_logprobs, '"sampler" (the log-probs the sampler computed '
                         'while decoding: no extra forward pass) | "recompute" (teacher-forced).',
                         choices=OLD_LOGPROBS)
  temperature: float = _f(PPOConfig.temperature, "Rollout sampling temperature (also divides "
                          "the logits of every log-prob).", lo=0.0, lo_ok=False)
  max_new_tokens: int = _f(64, "Token budget of a rollout.", lo=1)
  max_prompt_len: int = _f(192, "Longest prompt in tokens.", lo=1)
  eos_penalty: Optional[float] = _f(PPOConfig.eos_penalty, "EOS trick: whitened score of a "
                                    "completion without EOS (None = off).")
  safety_threshold: float = _f(PPOConfig.safety_threshold, "Rs cut of the combined reward.",
                               lo=0.0, hi=1.0, lo_ok=False, hi_ok=False)
  lr: float = _f(1e-6, "Policy LR, constant (paper: 1e-6); b1/b2/eps/weight decay/clip come "
                 "from config.optimizer.", lo=0.0)
  value_lr: float = _f(1e-6, "Value model LR, constant.", lo=0.0)
  num_prompts: int = _f(4096, "Training prompts: world: this many train-split prompts; file "
                        "sources: this many of the sources' train prompts (0 = all).", lo=0)
  eval_every: int = _f(10, "Held-out evaluation every N iterations (checkpoint selection by its "
                       "mean reward).", lo=0)
  eval_prompts: int = _f(64, "Distinct held-out prompts of each evaluation (one sample each at "
                         "ppo.temperature, fixed key).", lo=1)
  patience: int = _f(3, "Early stopping after this many evaluations without improvement (0 = "
                     "never stop).", lo=0)
  checkpoint_every: int = _f(10, "Save a checkpoint every N iterations (the last one and "
                             "SIGTERM always save).", lo=0)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """``config.pipeline``: stage "pipeline" (``llama_jax.recipe.pipeline``): SFT -> RMs -> RS x k
  -> PPO."""

  rs_iterations: int = _f(2, "Rejection-sampling iterations (RLHF-V1..Vk) before PPO (0 = "
                          "none).", lo=0)
  ppo: bool = _f(True, "Run PPO on top of the last rejection-sampled checkpoint.")
  rs_k: str = _f("", "Samples per prompt K of each rejection-sampling iteration, "
                 'comma-separated ("" = every iteration uses rejection_sampling.k).')
  rs_after_ppo: bool = _f(False, "A last rejection-sampling iteration on top of PPO (RLHF-V5 "
                          "style).")
  rs_sample_from: str = _f("", "Sample every rejection-sampling iteration from this (larger) "
                           "model's final/ dir and distil its best samples into the policy; "
                           '"" = the policy.')
  oracle_control: bool = _f(False, "Gold-reward control (synthetic world): a second PPO from "
                            'the same policy with ppo.reward="oracle" (stage ppo_oracle).')
  safety_aux_weight: float = _f(1.0, "Safety RM's auxiliary safe/unsafe loss weight "
                                "(reward.safety_aux_weight; Table 29).", lo=0.0)
  help_sources: str = _f("world_helpfulness,world_safety", "Helpfulness RM stage: sources.")
  help_weights: str = _f("1,1", "Helpfulness RM stage: mixture weights.")
  safety_sources: str = _f("world_safety,world_helpfulness", "Safety RM stage: sources.")
  safety_weights: str = _f("0.9,0.1", "Safety RM stage: mixture weights.")
  annotate_help_weight: float = _f(1.0, "Mixture weight of the annotated on-policy pairs in "
                                   "the helpfulness RM (ignored where the weights are \"\").",
                                   lo=0.0)
  annotate_safety_weight: float = _f(0.1, "Mixture weight of the annotated on-policy pairs in "
                                     "the safety RM.", lo=0.0)
  reward_lr: float = _f(1e-5, "Peak LR of the reward stages.", lo=0.0)
  reward_num_epochs: float = _f(1.0, "Epochs of the reward stages.", lo=0.0)
  reward_num_steps: int = _f(0, "Steps of the reward stages (0 = reward_num_epochs).", lo=0)
  reward_warmup_frac: float = _f(0.03, "Warmup of the reward stages as a share of their steps.",
                                 lo=0.0, hi=1.0)
  methods: str = _f("", "Alternatives run after the pipeline from its SFT policy and first "
                    "reward models, each in its own sub-workdir, comma-separated: dpo (on the "
                    "helpfulness RM's preference mixture) | rrhf (on rs_1's scored samples) | "
                    "raft (rounds of its own samples, scored by the RMs) | context_distillation "
                    "(the safety preprompt distilled, targeted by the safety RM) | gatt (Ghost "
                    "Attention: a system instruction held over turns) | sft_coreset / "
                    "sft_random (SFT from init_from on a coreset / a random subset of the "
                    "demonstrations, select_fraction of them); eval.py compares them with the "
                    "others.")
  method_lr: float = _f(0.0, "Peak LR of the dpo and rrhf stages (0 = optimizer.lr); raft "
                        "fine-tunes with rejection_sampling.lr.", lo=0.0)
  method_epochs: float = _f(0.0, "Epochs of the dpo and rrhf stages (0 = train.num_epochs).",
                            lo=0.0)
  select_fraction: float = _f(0.05, "Methods sft_coreset / sft_random: the share of each SFT "
                              "source's demonstrations they train on (data.select_fraction; "
                              "the coreset embeds with the pipeline's SFT policy), for about as "
                              "many optimizer steps as the full SFT (train.num_epochs divided by "
                              "it).", lo=0.0, hi=1.0, lo_ok=False)


SECTIONS = {"tokenizer": Tokenizer, "data": Data, "mesh": Mesh, "annotate": Annotate,
            "reward": Reward, "dpo": DPO, "rrhf": RRHF, "raft": RAFT,
            "context_distillation": ContextDistillation, "gatt": GAtt,
            "rejection_sampling": RejectionSampling, "ppo": PPO, "pipeline": Pipeline}
