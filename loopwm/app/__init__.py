"""The application layer: what each `loopwm` command does, as plain functions above the agents.

`session` (one run folder: lock, kind, config, logger, resume, signals), `collect`, `train`, `run`,
`evaluate`, `analyze` and `plot` (learning curves of run folders). `loopwm.cli` only parses arguments
and calls these.
"""
