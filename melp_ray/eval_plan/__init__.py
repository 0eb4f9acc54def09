"""What to evaluate and how it is reported, behind ``python -m melp_ray.evaluate`` and
``python -m melp_ray.benchmark``: the command line (options), its checks (plan_checks) and the
Plan built from it (plan), the zero-shot / linear / retrieval / generation runs (modes) and
their result files (report); the benchmark suite YAML (suite), one embedding pass per dataset
and model (benchmark) and the paper-style tables (bench_report). What evaluates (embeddings,
scores, metrics) is ``melp_ray.eval``, below it."""
