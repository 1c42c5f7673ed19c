"""Reward models: the Llama trunk with a scalar regression head, the ranking loss, the train step.

Llama 2 paper, Sec. 3.2.2: a reward model is the chat model with its next-token head replaced by a
scalar regression head; it scores one response alone (prompt + response), and is trained on
binary comparisons with ``L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(rating))``, the
margin ``m`` taken from Table 27. The reward is read at the last real token of a row (the EOS
after the response; Huang et al. 2024), never at padding, whichever side the padding is on. The
safety RM may add a binary term on the safety labels (Appendix A.4, Table 29; ``safety_aux_loss``).

Params: the Llama params tree (``llama_jax.model``) WITHOUT ``output``, plus::

  head/weight   [d]   float32   (logical axes ('embed',))
  head/bias     []    float32   (replicated)

Shape letters: b batch (pairs or rows), t sequence, d dim.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from llama_jax import convert, rl, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data.sources import RATINGS, SAFETY_LABELS
from llama_jax.model import forward, param_logical_axes
from llama_jax.train.state import TrainState, apply_gradients, split_microbatches

Batch = Dict[str, jax.Array]
# Llama 2 Table 27, in ``sources.RATINGS`` order (significantly better .. negligibly better/unsure).
MARGINS = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0),
           "large": (3.0, 2.0, 1.0, 0.0)}
MARKER = "reward_model.json"  # written next to params.json by save_reward_model
PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask", "rating")
# (chosen is safe, rejected is safe) per safety label, in ``sources.SAFETY_LABELS`` order.
_SAFE = {"chosen_safe_rejected_unsafe": (1.0, 0.0), "both_safe": (1.0, 1.0),
         "both_unsafe": (0.0, 0.0)}
SAFE_TARGETS = tuple(_SAFE[label] for label in SAFETY_LABELS)


# ---- params -----------------------------------------------------------------------------------
def head_logical_axes() -> dict:
  """Logical PartitionSpecs of ``params["head"]``: weight ('embed',) (FSDP-split like every
  model-dim axis), bias replicated."""
  return {"weight": P("embed"), "bias": P()}


def reward_param_logical_axes(cfg: LlamaConfig) -> Any:
  """Logical PartitionSpecs of reward params (Llama's without ``output``, plus the head)."""
  axes = dict(param_logical_axes(cfg))
  axes.pop("output")
  axes["head"] = head_logical_axes()
  return axes


def reward_param_shapes(cfg: LlamaConfig) -> Any:
  """Tree of ``jax.ShapeDtypeStruct`` of reward params (no memory allocated)."""
  shapes = dict(sharding.param_shapes(cfg))
  shapes.pop("output")
  shapes["head"] = {"weight": jax.ShapeDtypeStruct((cfg.dim,), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((), jnp.float32)}
  return shapes


def reward_param_shardings(cfg: LlamaConfig, mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """Tree of ``NamedSharding`` of reward params.

  Raises:
    ValueError: as ``sharding.logical_to_mesh_spec`` (e.g. dim not divisible by the fsdp axis).
  """
  return sharding.logical_to_sharding(reward_param_logical_axes(cfg), reward_param_shapes(cfg),
                                      mesh, rules)


def abstract_reward_params(cfg: LlamaConfig, mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """Reward params as ``jax.ShapeDtypeStruct`` with shardings (``StateSetup(abstract_params=)``)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      reward_param_shapes(cfg), reward_param_shardings(cfg, mesh, rules))


def init_head(dim: int, key: jax.Array) -> dict:
  """Head weight ~ N(0, 1/(d+1)) (Stiennon et al. 2020, the reward head of "Learning to
  summarize"), bias 0; both float32. With unit-RMS hidden states initial rewards are ~N(0, 1)."""
  weight = jax.random.normal(key, (dim,), jnp.float32) / np.sqrt(dim + 1.0)
  return {"weight": weight, "bias": jnp.zeros((), jnp.float32)}


def init_reward_params(llama_params: Any, key: jax.Array) -> Any:
  """Reward params from Llama params: drop ``output``, add a fresh head (see ``init_head``).

  Jit it with ``out_shardings=reward_param_shardings(...)`` to build it sharded.

  Raises:
    ValueError: if ``llama_params`` has no ``norm`` (not a Llama params tree).
  """
  if "norm" not in llama_params:
    raise ValueError("init_reward_params: expected a Llama params tree (with 'norm')")
  params = {k: v for k, v in llama_params.items() if k != "output"}
  params["head"] = init_head(llama_params["norm"].shape[-1], key)
  return params


# ---- scoring ----------------------------------------------------------------------------------
def token_scores(params: Any, cfg: LlamaConfig, tokens: jax.Array, *,
                 positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """The head applied to the final (RMS-normed) hidden state at every position.

  Args:
    params: reward params (``head`` + Llama trunk without ``output``).
    tokens: [b, t] int32. positions, segment_ids: [b, t] int32, as ``model.forward``.
  Returns:
    [b, t] float32 scores (PPO's value model reads them per token).
  """
  trunk = {k: v for k, v in params.items() if k != "head"}
  hidden = forward(trunk, tokens, cfg, positions=positions, segment_ids=segment_ids,
                   return_hidden=True)
  head = params["head"]
  return (jnp.einsum("btd,d->bt", hidden, head["weight"].astype(jnp.float32))
          + head["bias"].astype(jnp.float32))


def last_token_index(mask: jax.Array) -> jax.Array:
  """[b, t] bool real-token mask -> [b] int32 index of each row's last real token (left or right
  padding): ``rl.last_index``, with 0 for a row with no real token (a valid gather index)."""
  return jnp.maximum(rl.last_index(jnp.asarray(mask, bool)), 0)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """[b, t] bool -> [b, t] int32 RoPE positions counting real tokens only (0 at the first real
  token), so left padding does not shift positions; padding slots get 0."""
  mask = jnp.asarray(mask, bool)
  return jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0) * mask


def score(params: Any, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array, *,
          probability: bool = False) -> jax.Array:
  """Reward of each row at its last real token (the EOS after the response).

  Each row is scored alone (no access to the other response of a pair). Padding never reaches a
  real token: positions come from ``mask`` and padding is a separate attention segment.

  Args:
    params: reward params. tokens: [b, t] int32. mask: [b, t] bool, True on real tokens
      (contiguous, left or right padded).
    probability: return ``sigmoid(reward)`` (the paper's score in (0, 1), Sec. 3.2.3).
  Returns:
    [b] float32 rewards (or probabilities).
  """
  mask = jnp.asarray(mask, bool)
  scores = token_scores(params, cfg, tokens, positions=positions_from_mask(mask),
                        segment_ids=mask.astype(jnp.int32))
  r = jnp.take_along_axis(scores, last_token_index(mask)[:, None], axis=1)[:, 0]
  return jax.nn.sigmoid(r) if probability else r


# ---- loss -------------------------------------------------------------------------------------
def margin_values(rating: jax.Array, table: str) -> jax.Array:
  """[b] int32 rating ids (index into ``sources.RATINGS``, -1 = none) -> [b] float32 margins of
  Table 27 (``MARGINS[table]``; no rating -> 0).

  Raises:
    ValueError: for an unknown table name.
  """
  if table not in MARGINS:
    raise ValueError(f"margin table must be one of {tuple(MARGINS)}, got {table!r}")
  values = jnp.asarray(MARGINS[table], jnp.float32)
  rating = jnp.asarray(rating, jnp.int32)
  return jnp.where(rating >= 0, values[jnp.clip(rating, 0, len(RATINGS) - 1)], 0.0)


def ranking_loss(r_chosen: jax.Array, r_rejected: jax.Array, margin: jax.Array) -> jax.Array:
  """Binary ranking loss with margin, per pair (Llama 2 Eq. 1-2):
  ``-log sigmoid(r_chosen - r_rejected - margin)``; [b] float32 (margin 0 = Bradley-Terry)."""
  diff = (r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)
          - jnp.asarray(margin, jnp.float32))
  return -jax.nn.log_sigmoid(diff)


def pair_scores(params: Any, cfg: LlamaConfig, batch: Batch):
  """(r_chosen [b], r_rejected [b], valid [b] bool) for a preference batch: both responses in one
  forward pass of [2b, t] rows; a pair is valid if both rows have a real token."""
  b = batch["chosen_tokens"].shape[0]
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0).astype(bool)
  r = score(params, cfg, tokens, mask)
  valid = batch["chosen_mask"].astype(bool).any(1) & batch["rejected_mask"].astype(bool).any(1)
  return r[:b], r[b:], valid


def safety_targets(safety_label: jax.Array):
  """[b] int32 safety-label ids (index into ``sources.SAFETY_LABELS``, -1 = none) ->
  (chosen_safe [b] float32, rejected_safe [b] float32, labelled [b] bool): chosen is safe for
  ``chosen_safe_rejected_unsafe`` and ``both_safe``, rejected only for ``both_safe``; unlabelled
  pairs get targets 0 and ``labelled`` False."""
  label = jnp.asarray(safety_label, jnp.int32)
  labelled = label >= 0
  table = jnp.asarray(SAFE_TARGETS, jnp.float32)[jnp.clip(label, 0, len(SAFETY_LABELS) - 1)]
  return (jnp.where(labelled, table[:, 0], 0.0), jnp.where(labelled, table[:, 1], 0.0), labelled)


def safety_aux_loss(r_chosen: jax.Array, r_rejected: jax.Array,
                    safety_label: jax.Array) -> jax.Array:
  """The safety auxiliary loss per pair (Llama 2 Appendix A.4, Table 29): binary cross-entropy of
  ``sigmoid(r)`` (the score Rs) against "this response is safe", summed over both responses, so
  that Rs = 0.5 (r = 0) separates safe from unsafe responses::

    -[y_c log sig(r_c) + (1 - y_c) log sig(-r_c)] - [y_r log sig(r_r) + (1 - y_r) log sig(-r_r)]

  Args:
    r_chosen, r_rejected: [b] raw rewards (before the sigmoid). safety_label: [b] int32 ids as
      ``safety_targets``.
  Returns:
    [b] float32; 0 for unlabelled pairs (-1).
  """
  yc, yr, labelled = safety_targets(safety_label)
  bce = lambda r, y: -(y * jax.nn.log_sigmoid(r) + (1.0 - y) * jax.nn.log_sigmoid(-r))
  loss = bce(r_chosen.astype(jnp.float32), yc) + bce(r_rejected.astype(jnp.float32), yr)
  return jnp.where(labelled, loss, 0.0)


def _safety_label(batch: Batch, safety_aux_weight: float) -> jax.Array:
  if "safety_label" in batch:
    return batch["safety_label"]
  if safety_aux_weight:
    raise ValueError("safety_aux_weight > 0 needs batch['safety_label'] ([b] int32, -1 = none)")
  return jnp.full(batch["rating"].shape, -1, jnp.int32)


def _loss_terms(params, batch: Batch, cfg: LlamaConfig, margin: str,
                safety_aux_weight: float = 0.0):
  """(loss sum over valid pairs, stats sums): ranking loss + ``safety_aux_weight`` * aux loss."""
  rc, rr, valid = pair_scores(params, cfg, batch)
  w = valid.astype(jnp.float32)
  m = margin_values(batch["rating"], margin)
  label = _safety_label(batch, safety_aux_weight)
  wl = w * (label >= 0)
  rank, aux = jnp.sum(w * ranking_loss(rc, rr, m)), jnp.sum(wl * safety_aux_loss(rc, rr, label))
  stats = {"pairs": jnp.sum(w), "correct": jnp.sum(w * (rc > rr)), "r_chosen": jnp.sum(w * rc),
           "r_rejected": jnp.sum(w * rr), "margin": jnp.sum(w * m), "ranking": rank,
           "labelled": jnp.sum(wl), "aux": aux}
  # Weight 0 (static) leaves the ranking loss and its gradient exactly as without the term.
  return (rank + safety_aux_weight * aux if safety_aux_weight else rank), stats


def _accumulate(params, batch: Batch, accum_steps: int, cfg: LlamaConfig, margin: str,
                safety_aux_weight: float = 0.0):
  """(loss_sum, stats sums, grad of loss_sum) summed over ``accum_steps`` microbatches."""
  grad_fn = jax.value_and_grad(lambda p, b: _loss_terms(p, b, cfg, margin, safety_aux_weight),
                               has_aux=True)
  if accum_steps == 1:
    (total, stats), grads = grad_fn(params, batch)
    return total, stats, grads

  def body(carry, micro):
    (t, s), g = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (t, s, g)), None

  zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split_microbatches(
      batch, accum_steps)))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (zeros[0][0], zeros[0][1], zeros[1]))
  (total, stats, grads), _ = jax.lax.scan(body, init, split_microbatches(batch, accum_steps))
  return total, stats, grads


def train_step(state: TrainState, batch: Batch, rng: Optional[jax.Array] = None, *,
               cfg: LlamaConfig, optimizer: optax.GradientTransformation, margin: str = "none",
               accum_steps: int = 1, safety_aux_weight: float = 0.0):
  """One reward-model optimizer step (pure; jit with ``donate_argnums=0``).

  Loss = (sum over valid pairs of the ranking loss + ``safety_aux_weight`` * sum over labelled
  valid pairs of ``safety_aux_loss``) / (valid pairs), both sums taken over the whole
  (accumulated) batch.

  Args:
    state: TrainState over reward params.
    batch: preference batch (``pipeline.preference_batches``): ``chosen_tokens`` /
      ``rejected_tokens`` [b, t] int32, ``chosen_mask`` / ``rejected_mask`` [b, t] bool,
      ``rating`` [b] int32, ``safety_label`` [b] int32 (-1 = none; may be absent when
      ``safety_aux_weight`` is 0); ``b`` divisible by ``accum_steps``.
    rng: unused. cfg, optimizer, margin (a ``MARGINS`` key), accum_steps: static.
    safety_aux_weight: static float >= 0, the weight of the safety auxiliary loss (Llama 2
      Appendix A.4, Table 29; the safety RM's; 0 = the plain ranking loss, bit for bit).
  Returns:
    (new_state, metrics) float32 scalars: ``loss`` (the optimized loss above, mean per pair),
    ``ranking_loss`` (its ranking part, mean per pair), ``safety_aux_loss`` (mean aux loss per
    labelled valid pair, unweighted; 0 when none), ``safety_labelled`` (labelled valid pairs),
    ``accuracy`` (share of pairs with r_chosen > r_rejected), ``reward_chosen``,
    ``reward_rejected``, ``margin`` (means), ``pairs``, ``real_tokens``, ``grad_norm``,
    ``skipped`` (a batch without a valid pair).
  Raises:
    ValueError: (at trace time) if ``safety_aux_weight`` < 0, or > 0 without
      ``batch["safety_label"]``.
  """
  del rng
  if safety_aux_weight < 0:
    raise ValueError(f"safety_aux_weight must be >= 0, got {safety_aux_weight}")
  label = _safety_label(batch, safety_aux_weight)
  batch = {**{k: batch[k] for k in PAIR_KEYS}, "safety_label": label}
  total, stats, grads = _accumulate(state.params, batch, accum_steps, cfg, margin,
                                    safety_aux_weight)
  n = stats["pairs"]
  new_state, metrics = apply_gradients(state, grads, n, optimizer)
  d = jnp.maximum(n, 1.0)
  metrics.update(loss=total / d, ranking_loss=stats["ranking"] / d,
                 safety_aux_loss=stats["aux"] / jnp.maximum(stats["labelled"], 1.0),
                 safety_labelled=stats["labelled"],
                 accuracy=stats["correct"] / d, reward_chosen=stats["r_chosen"] / d,
                 reward_rejected=stats["r_rejected"] / d, margin=stats["margin"] / d, pairs=n,
                 real_tokens=(jnp.sum(batch["chosen_mask"]) + jnp.sum(batch["rejected_mask"]))
                 .astype(jnp.float32))
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, cfg: LlamaConfig, margin: str = "none",
              unsafe_threshold: float = 0.5) -> dict:
  """Sums over the valid pairs of a held-out batch (replicated scalars: multi-host safe).

  Args:
    batch: as ``train_step``, with ``safety_label``. cfg, margin, unsafe_threshold: static; a
      response is flagged unsafe when ``sigmoid(r) < unsafe_threshold`` (Table 29 uses 0.5).
  Returns:
    ``pairs``, ``correct``, ``loss_sum`` (ranking loss) [] float32; ``pairs_by_rating`` /
    ``correct_by_rating`` [5] (``RATINGS`` order, last = no rating); ``pairs_by_label`` /
    ``correct_by_label`` [4] (``SAFETY_LABELS`` order, last = no label); over labelled valid pairs
    (one example per response): ``safety_aux_sum`` (sum of ``safety_aux_loss``), ``unsafe`` /
    ``safe`` (responses per target), ``unsafe_flagged`` / ``safe_flagged`` (of those, flagged).
  """
  rc, rr, valid = pair_scores(params, cfg, batch)
  w = valid.astype(jnp.float32)
  correct = w * (rc > rr)
  loss = ranking_loss(rc, rr, margin_values(batch["rating"], margin))
  out = {"pairs": jnp.sum(w), "correct": jnp.sum(correct), "loss_sum": jnp.sum(w * loss)}
  for name, key, n in (("rating", "rating", len(RATINGS)), ("label", "safety_label",
                                                             len(SAFETY_LABELS))):
    ids = jnp.where(batch[key] >= 0, batch[key], n)
    onehot = jax.nn.one_hot(ids, n + 1, dtype=jnp.float32)
    out[f"pairs_by_{name}"] = jnp.sum(onehot * w[:, None], axis=0)
    out[f"correct_by_{name}"] = jnp.sum(onehot * correct[:, None], axis=0)
  yc, yr, labelled = safety_targets(batch["safety_label"])
  wl = w * labelled
  out["safety_aux_sum"] = jnp.sum(wl * safety_aux_loss(rc, rr, batch["safety_label"]))
  safe, r = jnp.concatenate([yc, yr]), jnp.concatenate([rc, rr])
  wl2, flagged = jnp.concatenate([wl, wl]), (jax.nn.sigmoid(r) < unsafe_threshold)
  out.update(unsafe=jnp.sum(wl2 * (1.0 - safe)), safe=jnp.sum(wl2 * safe),
             unsafe_flagged=jnp.sum(wl2 * (1.0 - safe) * flagged),
             safe_flagged=jnp.sum(wl2 * safe * flagged))
  return out


# ---- save / load --------------------------------------------------------------------------------
def save_reward_model(path: str, cfg: LlamaConfig, params: Any) -> str:
  """Write ``path/params.json`` (Meta), ``path/reward_model.json`` and orbax ``path/params/``
  (the layout of ``convert.save_orbax``, so ``train.checkpoint.restore_params(path,
  abstract_reward_params(...))`` restores it sharded). Replaces nothing: ``path`` must not exist
  or be empty.

  Returns:
    The orbax directory ``path/params``.
  Raises:
    ValueError: if params do not have the reward-param shapes of ``cfg`` (naming the leaf).
    FileExistsError: if ``path`` exists and is not empty.
  """
  check_reward_params(cfg, params)
  path = os.path.abspath(path)
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f"{path} exists and is not empty")
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.json"), "w") as f:
      json.dump(cfg.to_params_json(), f, indent=2)
    with open(os.path.join(path, MARKER), "w") as f:
      json.dump({"kind": "reward", "head": "scalar", "read_at": "last real token"}, f, indent=2)
  target = os.path.join(path, "params")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
    ckptr.wait_until_finished()
  return target


def is_reward_model(path: str) -> bool:
  """True if ``path`` was written by ``save_reward_model``."""
  return os.path.isfile(os.path.join(path, MARKER))


def load_reward_model(path: str) -> tuple[LlamaConfig, Any]:
  """(config, reward params as host numpy float32) of a ``save_reward_model`` directory.

  Raises:
    FileNotFoundError: if ``path`` is not a reward-model directory or ``params/`` is missing.
    ValueError: if the saved tree does not match ``params.json`` (naming the leaf).
  """
  path = os.path.abspath(path)
  if not is_reward_model(path):
    raise FileNotFoundError(f"{path} is not a reward model directory (no {MARKER})")
  convert.verify_checksums(path)
  cfg = LlamaConfig.from_params_json(os.path.join(path, "params.json"))
  target = os.path.join(path, "params")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"orbax checkpoint directory {target} not found")
  with ocp.StandardCheckpointer() as ckptr:
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), reward_param_shapes(cfg))
    params = ckptr.restore(target, abstract)
  check_reward_params(cfg, params)
  return cfg, jax.tree.map(np.asarray, params)


def check_reward_params(cfg: LlamaConfig, params: Any) -> None:
  """Raises ValueError naming the first leaf whose path or shape differs from ``cfg``'s reward
  params."""
  want = jax.tree_util.tree_flatten_with_path(reward_param_shapes(cfg))[0]
  got = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0])
  keys = {jax.tree_util.keystr(p) for p, _ in want}
  for p, s in want:
    k = jax.tree_util.keystr(p)
    if k not in got:
      raise ValueError(f"reward params: missing {k}")
    if tuple(got[k].shape) != tuple(s.shape):
      raise ValueError(f"reward params: {k} has shape {tuple(got[k].shape)}, expected {s.shape}")
  extra = sorted(set(got) - keys)
  if extra:
    raise ValueError(f"reward params: unexpected leaves {extra}")
