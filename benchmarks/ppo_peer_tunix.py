"""Tunix side of ``benchmarks/ppo_vs_peers.py``: one PPO iteration of google-tunix 0.1.7's
``PPOLearner`` (imported by that script; needs the Tunix virtualenv described there).

The learner's own pieces, in the order of its ``_run_all_micro_batch_steps`` without the thread
and queue around them: ``PPOLearner._generate_and_compute_advantage`` (``RLCluster.generate``:
the vanilla sampler; then reference log-probs, old log-probs recomputed by a teacher-forced pass
of the rollout policy, values, reward-model scores, KL-penalized rewards and GAE), then
``RLCluster.update_actor`` and ``RLCluster.update_critic`` over the minibatches. Timed: generation
= ``RLCluster.generate`` (prefill + decode, tokens fetched to the host); scoring = the rest of
``_generate_and_compute_advantage`` (4 forwards: reference, old policy, value, reward);
update = ``update_actor`` + ``update_critic`` until the new params are ready.

Models: Tunix's ``Llama3`` (``segment_ids`` dropped: ``tunix.rl.common.compute_score`` passes
it, ``Llama3.__call__`` does not take it; the attention mask already masks padding); value and
reward models are the same trunk with the ``lm_head`` replaced by a ``[dim, 1]`` einsum. Token ids
go in as strings of numbers through a small id tokenizer: no BOS added, pad = vocab and EOS =
vocab + 1 (ids never sampled, so every row decodes all its tokens and nothing is masked).
"""

from __future__ import annotations

import time

from flax import nnx
import jax
import numpy as np
import optax
from tunix.models.llama3 import model as llama3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl import utils as rl_utils
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout


class Llama(llama3.Llama3):
  """Tunix Llama3 that accepts (and ignores) the ``segment_ids`` Tunix's RL code passes."""

  def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
    del segment_ids
    return super().__call__(input_tokens, positions, cache, attention_mask)


class ScalarLlama(Llama):
  """Value / reward model: the Llama trunk with a ``[dim, 1]`` head (outputs ``[B, T, 1]``)."""

  def __init__(self, config, *, rngs):
    super().__init__(config, rngs=rngs)
    self.lm_head = llama3.Einsum(einsum_str="BTD,DV->BTV", shape=(config.embed_dim, 1),
                                 rngs=rngs, sharding=config.shd_config.emb_dv)


class IdTokenizer:
  """Strings of space-separated token ids <-> ids (Tunix's rollout takes string prompts)."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, text, **kw):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 0  # falsy: the sampler adds no BOS

  def eos_id(self):
    return self.vocab + 1

  def pad_id(self):
    return self.vocab


def num_params(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class TunixPPO:
  """One Tunix PPO iteration per ``__call__``: returns ({phase: seconds}, counts)."""

  def __init__(self, *, dim, n_layers, n_heads, ffn_dim, vocab, prompts, new_tokens, minibatch,
               lr=1e-6, beta=0.01):
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    mcfg = llama3.ModelConfig(num_layers=n_layers, vocab_size=vocab, embed_dim=dim,
                              hidden_dim=ffn_dim, num_heads=n_heads, head_dim=dim // n_heads,
                              num_kv_heads=n_heads, rope_theta=10_000, norm_eps=1e-5)
    with self.mesh:
      actor = Llama(mcfg, rngs=nnx.Rngs(0))
      reference = Llama(mcfg, rngs=nnx.Rngs(0))  # the same weights as the actor
      critic = ScalarLlama(mcfg, rngs=nnx.Rngs(1))
      reward = ScalarLlama(mcfg, rngs=nnx.Rngs(2))
    self.params = {"policy": num_params(actor), "value": num_params(critic)}
    tok = IdTokenizer(vocab)
    self.prompts = [tok.decode(row) for row in np.asarray(prompts)]
    b, p = np.asarray(prompts).shape
    rollout_cfg = base_rollout.RolloutConfig(
        max_tokens_to_generate=new_tokens, max_prompt_length=p, kv_cache_size=p + new_tokens,
        temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[tok.eos_id()])
    train_cfg = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(lr), critic_optimizer=optax.adamw(lr),
        eval_every_n_steps=10**9, max_steps=10**9, mini_batch_size=minibatch,
        train_micro_batch_size=minibatch, rollout_micro_batch_size=b,
        compute_logps_micro_batch_size=b, pbar_description=None)
    cluster_cfg = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: self.mesh for role in rl_cluster_lib.Role}, rollout_engine="vanilla",
        offload_to_cpu=False, training_config=train_cfg, rollout_config=rollout_cfg)
    self.cluster = rl_cluster_lib.RLCluster(actor=actor, critic=critic, reference=reference,
                                            reward=reward, tokenizer=tok,
                                            cluster_config=cluster_cfg)
    self.learner = ppo_learner.PPOLearner(self.cluster, ppo_learner.PPOConfig(
        num_iterations=1, beta=beta, kl_method="kl", gamma=1.0, gae_lambda=0.95))
    self.learner._rollout_micro_batch_size = b  # what PPOLearner.train sets before its loop
    self.learner._compute_logps_micro_batch_size = b
    self.minibatch = minibatch
    self._generate = self.cluster.generate
    self.cluster.generate = self._timed_generate
    self._gen = {}

  def _timed_generate(self, *args, **kwargs):
    t0 = time.perf_counter()
    out = self._generate(*args, **kwargs)  # tokens come back as host numpy arrays
    self._gen = {"seconds": time.perf_counter() - t0,
                 "tokens": [len(t) for t in out.tokens]}
    return out

  def __call__(self):
    actor, critic = self.cluster.actor_trainer, self.cluster.critic_trainer
    steps0 = (actor.train_steps, critic.train_steps)
    t0 = time.perf_counter()
    example = self.learner._generate_and_compute_advantage({"prompts": self.prompts})
    jax.block_until_ready([x for x in jax.tree.leaves(example) if isinstance(x, jax.Array)])
    t1 = time.perf_counter()
    b = example.completion_ids.shape[0]
    mbs = [rl_utils.get_batch_slice(example, slice(s, s + self.minibatch))
           for s in range(0, b, self.minibatch)]
    self.cluster.update_actor(mbs, None)
    self.cluster.update_critic(mbs, None)
    jax.block_until_ready((nnx.state(actor.model), nnx.state(critic.model)))
    t2 = time.perf_counter()
    gen = self._gen["seconds"]
    counts = {"tokens": int(sum(self._gen["tokens"])),
              "min_row_tokens": int(min(self._gen["tokens"])),
              "policy_steps": actor.train_steps - steps0[0],
              "value_steps": critic.train_steps - steps0[1]}
    return {"generation": gen, "scoring": t1 - t0 - gen, "update": t2 - t1}, counts
