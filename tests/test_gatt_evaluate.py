"""Ghost Attention's sampling and evaluation (llama_jax.gatt.evaluate): the turn-by-turn rollout
(the instruction in every turn, resume from turn files, context stops, token counts) and the
paired per-turn comparison of adherence and correctness against NumPy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llama_jax import stats
from llama_jax.config import LlamaConfig
from llama_jax.data import world
from llama_jax.gatt import evaluate
from llama_jax.gatt import step as gatt
from train_helpers import instruction_tokenizer

PROMPTS = ("What is 3 plus 4?", "Reverse the list: cat, dog, owl.", "How many words are in this "
           "list: sun, van?")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return instruction_tokenizer(tmp_path_factory)


def test_compare_pairs_by_dialog_against_numpy(tmp_path):
  rng = np.random.default_rng(0)
  n, t = 30, 12
  before = {k: (rng.random((n, t)) < 0.3).astype(float) for k in ("follows", "correct")}
  after = {k: (rng.random((n, t)) < 0.8).astype(float) for k in ("follows", "correct")}
  after["follows"][:5, 8:] = np.nan  # dialogs that ended early: only paired turns count
  out = evaluate.compare(before, after, late_turn=10)
  f = out["follows"]
  np.testing.assert_allclose(f["before"], before["follows"].mean(0))
  both = ~np.isnan(after["follows"][:, 9:])
  a, b = before["follows"][:, 9:][both], after["follows"][:, 9:][both]
  assert f["late"]["pairs"] == both.sum() == 25 * 3
  assert f["late"]["difference"]["mean"] == pytest.approx(b.mean() - a.mean())
  dialog = np.broadcast_to(np.arange(n)[:, None], (n, 3))[both]
  ref = stats.bootstrap_paired_difference(b, a, clusters=dialog, seed=0)
  assert (f["late"]["difference"]["lo"], f["late"]["difference"]["hi"]) == (ref["lo"], ref["hi"])
  d0 = f["difference"][0]
  assert d0["mean"] == pytest.approx(after["follows"][:, 0].mean() - before["follows"][:, 0].mean())
  assert f["n_after"][11] == 25 and f["n_before"][11] == 30
  cf = out["correct_if_following"]["after"]
  follows = after["follows"][:, 9:] == 1
  assert cf["late"] == pytest.approx(after["correct"][:, 9:][follows].mean())
  assert cf["turn_1"] == pytest.approx(after["correct"][after["follows"][:, 0] == 1, 0].mean())
  none = evaluate.compare({**before, "follows": np.zeros((n, t))}, after)
  assert none["correct_if_following"]["before"] == {"turn_1": None, "turns_2+": None,
                                                    "late": None}
  evaluate.plot(out, str(tmp_path / "a.png"))
  assert (tmp_path / "a.png").stat().st_size > 1000


# ---- the rollout ---------------------------------------------------------------------------------
class _Policy:
  def __init__(self, max_seq_len):
    self.cfg, self.params, self.mesh = LlamaConfig(max_seq_len=max_seq_len), None, None


def test_rollout_bookkeeping_resume_and_context_stops(tok, tmp_path, monkeypatch):
  calls = []
  def fake_generate(policy, tokenizer, ids, key, temperature, max_new_tokens, batch_size, pad):
    calls.append([tokenizer.decode(x) for x in ids])
    t = len(calls)
    texts = [f"The answer is {t}{i}." for i in range(len(ids))]
    return (texts, [not (t == 2 and i == 0) for i in range(len(ids))],  # turn 2: row 0 truncated
            10 * t + len(ids))  # a token count that names the turn
  monkeypatch.setattr(evaluate, "_generate", fake_generate)
  dialogs = [{"instruction": world.INSTRUCTIONS[0], "turns": list(PROMPTS[:3])},
             {"instruction": world.INSTRUCTIONS[5], "turns": list(PROMPTS[:2])},
             {"instruction": world.INSTRUCTIONS[1], "turns": [PROMPTS[0]] * 3}]
  kw = dict(system_every_turn=True, temperature=1.0, max_new_tokens=8, batch_size=4,
            key=jax.random.key(0), pad_to_multiple=16)
  out = evaluate.rollout(_Policy(4096), tok, dialogs, turn_dir=str(tmp_path / "t"), **kw)
  assert out["texts"] == [["The answer is 10.", "The answer is 20."],
                          ["The answer is 11.", "The answer is 21."],
                          ["The answer is 12.", "The answer is 22.", "The answer is 30."]]
  assert out["finished"] == [[True, False], [True, True], [True, True, True]]
  assert out["context_stops"] == 0
  assert out["tokens_sampled"] == (10 + 3) + (20 + 3) + (30 + 1)  # the turns' counts, summed
  assert all(p.count(d["instruction"]) == 2 for p, d in zip(calls[1], dialogs))  # every turn
  assert "The answer is 12." in calls[2][0]  # its own earlier answers
  # Going on after an unfinished answer (the evaluation's way): dialog 0 gets its third turn.
  calls.clear()
  on = evaluate.rollout(_Policy(4096), tok, dialogs, end_on_unfinished=False, **kw)
  assert [len(t) for t in on["texts"]] == [3, 2, 3] and on["finished"][0] == [True, False, True]
  assert "The answer is 20." in calls[2][0]  # the truncated answer stays in its context
  # Resume: the turn files are reused, nothing is generated again.
  calls.clear()
  assert evaluate.rollout(_Policy(4096), tok, dialogs, turn_dir=str(tmp_path / "t"), **kw) == out
  assert calls == []
  # A stop after turn 1, then a resume that generates turns 2 and 3 only.
  stop_dir = str(tmp_path / "s")
  with pytest.raises(evaluate.Stopped, match="turn 1"):
    evaluate.rollout(_Policy(4096), tok, dialogs, turn_dir=stop_dir, stop=lambda: True, **kw)
  calls.clear()
  resumed = evaluate.rollout(_Policy(4096), tok, dialogs, turn_dir=stop_dir, **kw)
  assert [t[0] for t in resumed["texts"]] == [t[0] for t in out["texts"]]  # turn 1: the file's
  assert len(calls) == 2  # turns 2 and 3
  # A context too short for the second turn: the dialogs stop there and are counted.
  first = max(len(tok.encode_dialog(gatt.messages(d["instruction"], d["turns"][:1], []),
                                    system_every_turn=True)[0]) for d in dialogs)
  short = -(-first // 16) * 16 + 8
  calls.clear()
  cut = evaluate.rollout(_Policy(short), tok, dialogs, **kw)
  assert [len(t) for t in cut["texts"]] == [1, 1, 1] and cut["context_stops"] == 3
