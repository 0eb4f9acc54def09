"""What evaluates a MELP model: each dataset's records and labels (datasets, class_lists,
splits, shard_source), reading one record (records), the model and its embeddings with Ray
Data batch inference (embeddings, inference), and the scores: zero-shot, linear probe,
metrics, generation. What to evaluate and how it is reported (the command line, the Plan,
the runs, result files, the benchmark suite) is ``melp_ray.eval_plan``, above it.

Submodules are imported on use (``from melp_ray.eval.metrics import macro_auroc``) so that
importing the package pulls in neither torch nor matplotlib.
"""
