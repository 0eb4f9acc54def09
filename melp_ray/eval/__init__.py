"""Evaluation of MELP models, behind ``python -m melp_ray.evaluate``.

Model-independent pieces: ``metrics``, ``prompts``, ``zero_shot`` (scoring), ``linear_probe``,
``inference`` (a Ray Data actor pool) and ``report`` (result files). The command line's
pipeline: ``plan`` (arguments checked into a Plan), ``embeddings`` (the model and its
embeddings of the records) and ``modes`` (zero-shot / linear / retrieval runs).

Submodules are imported on use (``from melp_ray.eval.metrics import macro_auroc``) so that
importing the package pulls in neither torch nor matplotlib.
"""
