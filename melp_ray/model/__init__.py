"""The MELP model (plain PyTorch, no Ray): config, model, parameter counts, and its three losses (losses)."""
from melp_ray.model.config import ModelConfig, model_config_from_preset
from melp_ray.model.melp import MELP, count_parameters

__all__ = ["MELP", "ModelConfig", "model_config_from_preset", "count_parameters"]
