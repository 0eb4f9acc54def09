"""The Ray Train + DeepSpeed machinery shared by the stage-1 (text) and stage-2 (MELP) recipes."""
