"""Weights in and out: training checkpoints -> fp32 weights / a MELP model (checkpoint), MELP as
a Hugging Face model (hf, hf_config, hf_model) whose folder ships its own code rendered from
the model modules (custom_code), the export folder (export) and its upload (push), and the
official MELP weights read (reference_files), renamed (reference_weights) and converted
(convert). ``import melp_ray.hub.hf`` registers MELP with transformers' Auto classes."""
