"""Data layer of the training stages.

Modules (import them directly; this package imports nothing so that, e.g., the world generator
does not pull in TFDS):

* ``sources``: parsers of real data (HH-RLHF, generic JSONL SFT / preference / prompt files,
  Self-Instruct) into validated plain records; record schemas, ``RATINGS``, ``SAFETY_LABELS``.
* ``world``: the seeded synthetic assistant world (prompts, demonstrations, preference pairs,
  oracle judge, world tokenizer).
* ``tfds_builders``: TFDS builders (array_record, read without TensorFlow) for every source.
* ``pipeline``: grain pipelines (sharding, shuffling, tokenization, packing, mixtures,
  checkpointable iterators) producing SFT, preference and prompt batches.
"""
