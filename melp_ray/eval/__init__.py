"""Model-independent evaluation: metrics, zero-shot prompts/scoring, linear probing, reports.

Submodules are imported on use (``from melp_ray.eval.metrics import macro_auroc``) so that
importing the package pulls in neither torch nor matplotlib.
"""
