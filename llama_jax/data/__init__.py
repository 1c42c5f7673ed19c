"""Data layer of the training stages.

Modules (import them directly; this package imports nothing so that, e.g., the world generator
does not pull in TFDS):

* ``sources``: parsers of real data (HH-RLHF, generic JSONL SFT / preference / prompt files,
  Self-Instruct) into validated plain records; record schemas, ``RATINGS``, ``SAFETY_LABELS``.
* ``world``: the seeded synthetic assistant world (prompts, demonstrations, preference pairs,
  oracle judge); ``world_tasks``: its task families, habits and response texts;
  ``world_tokenizer``: its small BPE tokenizer.
* ``tfds_builders``: TFDS builders (array_record, read without TensorFlow) for every source.
* ``input_pipeline``: grain pipelines (sharding, shuffling, tokenization, packing, mixtures,
  checkpointable iterators) producing SFT, preference and prompt batches.
* ``prompts``: prompt sets of the RLHF stages, split into disjoint streams per stage.
"""
