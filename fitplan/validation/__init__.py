"""The validation suite: a matrix of jobs measured on GPUs against the estimator's predictions.

matrix (the rows and their fit/check split), runner (one fresh process per row), figures (a
row's predicted and measured figures), report (CSV, markdown, scatter plot, summary figures),
calibrate (runtime constants fitted on the fit rows), repredict and trainer_reports (committed
results read back). The GPU runs themselves: single_gpu_runs, multi_gpu_runs and profile_runs
(`fitplan train` jobs, one fresh process each) and multi_gpu_layers (the TP layer checks under
torchrun).
"""
