"""Everything fitplan shows people: rich tables, markdown and PNG, one module per thing shown.

The commands parse their flags, call the planner or the trainer, and hand the result here.
Nothing in this package computes an estimate; matplotlib is imported only by `plot`.
"""
