"""Training machinery every stage shares: ``state`` (TrainState, gradient accumulation, sharded
setup), ``loop`` (steps, logging, evaluation, checkpoints, signals), ``stage`` (the one stage
skeleton: prepare -> state -> loop -> export), ``workdir`` (config.json, final/, result.json),
``settings`` (shared config checks), ``build`` (config -> objects), ``optim``, ``checkpoint``,
``metrics``."""
