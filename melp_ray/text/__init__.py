"""The text side of the model library: reports -> token ids (report_ids), the offline text
models and their pruned report vocabulary (models), and the zero-shot class prompts
(prompts). Stage 1, which trains a text model of its own, is ``melp_ray.text_mlm``."""
