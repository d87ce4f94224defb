"""The validation suite: a matrix of jobs measured on GPUs against the estimator's predictions.

matrix (the rows and their fit/check split), runner (one fresh process per row), report (CSV,
markdown, scatter plot, summary figures), calibrate (runtime constants fitted on the fit rows).
"""
