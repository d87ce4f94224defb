"""fitplan: will this training job fit on these GPUs, and if not, what is the cheapest fix?

The estimate path (config -> profiles -> estimator) is pure Python and never imports torch.
"""

__version__ = "0.1.0"
