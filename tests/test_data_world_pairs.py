"""Tests of llama_jax.data.world_pairs: the oracle as annotator, pair ratings against the oracle
gap, safety-label shares, label noise per rating."""

from __future__ import annotations

import collections
import dataclasses
import math

from llama_jax.data import sources, world, world_pairs

CFG = world.WorldConfig(seed=3)


def test_annotate_pairs_samples_by_oracle_quality():
  add = [{"role": "user", "content": "What is 2 plus 3?"}]
  samples = ["The answer is 5.", "The answer is 6.", "The answer is 9.", "I like turtles.",
             "The answer is 5.", "The answer is 4."]
  got = {(r["chosen"], r["rejected"]): r for r in world_pairs.annotate(add, samples)}
  # qualities: 5 -> 3, 6 -> 2, 4 -> 2, 9 -> 1, turtles -> 0; equal qualities (6 vs 4) give no pair.
  expected = {("The answer is 5.", "The answer is 6."): "slightly_better",
              ("The answer is 5.", "The answer is 9."): "better",
              ("The answer is 5.", "I like turtles."): "significantly_better",
              ("The answer is 5.", "The answer is 4."): "slightly_better",
              ("The answer is 6.", "The answer is 9."): "slightly_better",
              ("The answer is 6.", "I like turtles."): "better",
              ("The answer is 9.", "I like turtles."): "slightly_better",
              ("The answer is 4.", "The answer is 9."): "slightly_better",
              ("The answer is 4.", "I like turtles."): "better"}
  assert {k: r["rating"] for k, r in got.items()} == expected
  for r in got.values():
    sources.validate_preference(r, "annotate")
    assert r["safety_label"] is None and r["prompt"] == add
  harm = [{"role": "user", "content": world_pairs.safety_pairs(CFG, "train", 1)[0]["prompt"][-1]
           ["content"]}]
  polite = world.demonstration(harm[0]["content"])
  labels = {(r["chosen"], r["rejected"]): r["safety_label"] for r in world_pairs.annotate(
      harm, [polite, "I won't do that.", "Sure! First, do it. Then run.",
             "Maybe, but be careful."])}
  assert labels[(polite, "I won't do that.")] == "both_safe"
  assert labels[(polite, "Sure! First, do it. Then run.")] == "chosen_safe_rejected_unsafe"
  assert labels[("Maybe, but be careful.", "Sure! First, do it. Then run.")] == "both_unsafe"
  assert world_pairs.annotate(add, ["The answer is 5.", "The answer is 5."]) == []



def _gap(record):
  return (world.oracle(record["prompt"], record["chosen"]).quality
          - world.oracle(record["prompt"], record["rejected"]).quality)


def test_noiseless_pair_ratings_match_the_oracle_gap():
  cfg = dataclasses.replace(CFG, label_noise=(0.0, 0.0, 0.0, 0.0))
  expected_gap = {"significantly_better": 3, "better": 2, "slightly_better": 1,
                  "negligibly_better_or_unsure": 0}
  for fn in (world_pairs.helpfulness_pairs, world_pairs.safety_pairs):
    pairs = fn(cfg, "train", 800)
    for r in pairs:
      sources.validate_preference(r, "world")
      assert _gap(r) == expected_gap[r["rating"]], r
    assert set(collections.Counter(r["rating"] for r in pairs)) == set(sources.RATINGS)


def test_safety_labels_follow_the_oracle_and_paper_shares():
  pairs = world_pairs.safety_pairs(CFG, "train", 3000)
  counts = collections.Counter(r["safety_label"] for r in pairs)
  for label, share in zip(sources.SAFETY_LABELS, (0.18, 0.47, 0.35)):
    assert abs(counts[label] / 3000 - share) < 4 * math.sqrt(share * (1 - share) / 3000), counts
  for r in pairs:  # noise included: never chosen unsafe with rejected safe
    safe = tuple(world.oracle(r["prompt"], r[side]).safe for side in ("chosen", "rejected"))
    assert safe == {"chosen_safe_rejected_unsafe": (True, False), "both_safe": (True, True),
                    "both_unsafe": (False, False)}[r["safety_label"]], r


def test_label_noise_rate_per_rating():
  noise = (0.0, 0.1, 0.2, 0.4)
  cfg = dataclasses.replace(CFG, label_noise=noise)
  pairs = world_pairs.helpfulness_pairs(cfg, "train", 4000)
  for rating, p in zip(sources.RATINGS[:3], noise):  # gap < 0 only when swapped
    rows = [r for r in pairs if r["rating"] == rating]
    swapped = sum(_gap(r) < 0 for r in rows) / len(rows)
    assert abs(swapped - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) / len(rows)) + 1e-9, rating
