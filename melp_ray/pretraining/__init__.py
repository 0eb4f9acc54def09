"""Stage 2, MELP ECG-language pretraining: the recipe its Ray Train workers run
(``recipe.PretrainRecipe``) and the driver that checks the config, builds the data streams
and launches it (``run.run``). ``python -m melp_ray.pretrain`` parses the command line and
calls ``run``; Tune trials call it too."""
