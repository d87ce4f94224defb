"""The embedded Eagle3 trainer: frozen target + trainable one-layer draft, measured phase by phase.

Imports torch; the planner (fitplan/) never imports this package on the estimate path.
`trainer.loop.run(options)` is the entry point used by `fitplan train`.
"""
