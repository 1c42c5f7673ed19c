"""Training machinery every stage shares: ``state`` (TrainState, gradient accumulation, sharded
setup), ``loop`` (steps, logging, evaluation, checkpoints, signals), ``stage`` (the one stage
skeleton: prepare -> state -> loop -> export), ``workdir`` (config.json, final/, result.json),
``settings`` / ``sections`` / ``fields`` (typed config sections, checked once before a stage
starts), ``build`` (config -> objects), ``optim``, ``checkpoint``, ``metrics``."""
