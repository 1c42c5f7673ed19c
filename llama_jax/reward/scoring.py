"""Rewards of (prompt, completion) pairs for rejection sampling, PPO and evaluation.

Two kinds, chosen by a stage's ``reward`` field (``rejection_sampling.reward``, ``ppo.reward``):

* ``"rm"``: the learned reward models, as they were trained (prompt + assistant answer + EOS, each
  row scored alone at its last token), combined into Llama 2's piecewise ``Rc`` (Sec. 3.2.3:
  ``Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh``; sigmoid scores).
* ``"oracle"``: the synthetic world's judge as the reward (:func:`llama_jax.data.world.gold_reward`
  of its graded quality): the gold-reward control that separates reward-model error from
  optimization (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

Both return the same dict of [n] float64 arrays (``rc`` in (0, 1), plus ``r_help`` / ``r_safe``
for reward models), so a stage never needs to know which one it has.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from llama_jax import rl
from llama_jax.config import LlamaConfig
from llama_jax.data import world
from llama_jax.reward import step as reward

REWARD_KINDS = ("rm", "oracle")


class RewardModels(NamedTuple):
  """The frozen reward models of a stage: their shared config, the helpfulness RM's params and
  the safety RM's params (None without a safety RM)."""

  cfg: LlamaConfig
  help: Any
  safety: Optional[Any]

  def on_device(self, sharding=None) -> "RewardModels":
    """The params put on the device(s) once (``sharding``: e.g. replicated over a mesh)."""
    put = lambda x: None if x is None else jax.device_put(x, sharding)
    return RewardModels(self.cfg, put(self.help), put(self.safety))


def load_reward_models(help_rm: str, safety_rm: str, field: str) -> RewardModels:
  """:class:`RewardModels` from reward-model directories (``<rm>/final``).

  Raises:
    ValueError: if ``help_rm`` is empty or the two models' configs differ (naming ``field``).
    FileNotFoundError: if a directory is not a reward model.
  """
  if not help_rm:
    raise ValueError(f"{field}.help_rm is empty: give a reward model directory (<rm>/final)")
  rcfg, help_params = reward.load_reward_model(help_rm)
  safe_params = None
  if safety_rm:
    scfg, safe_params = reward.load_reward_model(safety_rm)
    if scfg.to_params_json() != rcfg.to_params_json():
      raise ValueError(f"{field}: help_rm and safety_rm have different model shapes")
  return RewardModels(rcfg, help_params, safe_params)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(params, tokens, mask, *, cfg):
  return reward.score(params, cfg, tokens, mask, probability=True)


def score_dialogs(rcfg, help_params, safe_params, tokenizer, prompts: Sequence[Sequence[Mapping]],
                  completions: Sequence[str], is_safety: Sequence[bool], *,
                  threshold: float = 0.15, batch_size: int = 64) -> dict:
  """Reward-model scores of (prompt, completion) dialogs, as the RMs were trained: prompt +
  assistant answer + EOS, each row scored alone at its last token.

  Returns:
    dict of [n] float64 arrays: ``r_help``, ``r_safe`` (= r_help without a safety RM) sigmoid
    scores and ``rc``, the combined reward (Llama 2 Sec. 3.2.3).
  """
  rows = [tokenizer.encode_dialog(list(p) + [{"role": "assistant", "content": c}])[0]
          for p, c in zip(prompts, completions)]
  r_help, r_safe = [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    t = -(-max(len(r) for r in chunk) // 16) * 16
    tokens = np.full((batch_size, t), tokenizer.pad_id, np.int32)
    mask = np.zeros((batch_size, t), bool)
    for i, r in enumerate(chunk):
      tokens[i, :len(r)], mask[i, :len(r)] = r, True
    mask[len(chunk):, 0] = True  # filler rows: one token, discarded
    r_help.append(np.asarray(_score(help_params, tokens, mask, cfg=rcfg))[:len(chunk)])
    if safe_params is not None:
      r_safe.append(np.asarray(_score(safe_params, tokens, mask, cfg=rcfg))[:len(chunk)])
  h = np.concatenate(r_help).astype(np.float64) if rows else np.zeros(0)
  s = np.concatenate(r_safe).astype(np.float64) if safe_params is not None and rows else h
  rc = h if safe_params is None else np.asarray(
      rl.combined_reward(h, s, np.asarray(is_safety, bool), threshold), np.float64)
  return {"r_help": h, "r_safe": s, "rc": rc}


def oracle_scores(prompts: Sequence[Sequence[Mapping]], completions: Sequence[str]) -> dict:
  """The world oracle's gold reward of each completion (:func:`world.gold_reward`).

  Returns:
    dict of [n] float64 arrays ``rc`` (gold reward in (0, 1)) and ``gold`` (the same).
  Raises:
    ValueError: if a prompt is not a world prompt.
  """
  rc = np.asarray([world.gold_reward(world.oracle(list(p), c))
                   for p, c in zip(prompts, completions)], np.float64)
  return {"rc": rc, "gold": rc}


class Scorer:
  """``scorer(prompts, completions, is_safety) -> dict`` of [n] float64 arrays (``rc`` always).

  Attributes:
    kind: ``"rm"`` or ``"oracle"``. rms: :class:`RewardModels` for ``"rm"``, else None. threshold: the Rs cut of ``Rc`` (0.15).
  """

  def __init__(self, kind: str, tokenizer=None, rms: Optional[RewardModels] = None,
               threshold: float = 0.15, batch_size: int = 64):
    if kind not in REWARD_KINDS:
      raise ValueError(f"reward must be one of {REWARD_KINDS}, got {kind!r}")
    if kind == "rm" and rms is None:
      raise ValueError("Scorer('rm') needs the reward models")
    self.kind, self.tokenizer, self.rms = kind, tokenizer, rms
    self.threshold, self.batch_size = threshold, batch_size

  def __call__(self, prompts: Sequence[Sequence[Mapping]], completions: Sequence[str],
               is_safety: Sequence[bool]) -> dict:
    if self.kind == "oracle":
      return oracle_scores(prompts, completions)
    return score_dialogs(*self.rms, self.tokenizer, prompts, completions, is_safety,
                         threshold=self.threshold, batch_size=self.batch_size)


def make_scorer(config, section: str, tokenizer) -> Scorer:
  """The scorer of ``config.<section>`` (``rejection_sampling`` or ``ppo``): its ``reward``
  (``"rm"``: ``help_rm`` / ``safety_rm``; ``"oracle"``: the world judge) and
  ``safety_threshold``.

  Raises:
    ValueError: naming the field, for an unknown reward kind, ``"oracle"`` off the world, or a
      missing ``help_rm``; FileNotFoundError for a directory that is not a reward model.
  """
  c = config[section]
  kind = c.get("reward", "rm")
  if kind not in REWARD_KINDS:
    raise ValueError(f"config.{section}.reward must be one of {REWARD_KINDS}, got {kind!r}")
  if kind == "oracle":
    if config.tokenizer.path != "world":
      raise ValueError(f"config.{section}.reward='oracle' needs the synthetic world "
                       "(config.tokenizer.path='world'): real data has no oracle")
    return Scorer("oracle", tokenizer, threshold=float(c.safety_threshold))
  rms = load_reward_models(c.help_rm, c.safety_rm, f"config.{section}")
  # On the device once, not re-transferred by every scoring batch.
  return Scorer("rm", tokenizer, rms.on_device(), threshold=float(c.safety_threshold))


def reward_length_correlation(rewards: Any, lengths: Any) -> float:
  """Pearson correlation of rewards with response lengths (NaN for fewer than 2 rows or a
  constant input): a reward that mostly tracks length is a length-hacking risk (Huang et al.
  2024; Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF")."""
  r, n = np.asarray(rewards, np.float64), np.asarray(lengths, np.float64)
  if len(r) < 2 or np.std(r) == 0 or np.std(n) == 0:
    return float("nan")
  return float(np.corrcoef(r, n)[0, 1])
