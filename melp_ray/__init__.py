"""melp_ray: MELP (multi-scale ECG-language pretraining) on Ray Data, Ray Train, Ray Tune and DeepSpeed."""
__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """After ``import melp_ray``, ``AutoModel.from_pretrained(exported_folder)`` returns MELP.

    Costs the transformers import (a second or two), which every entry point needs anyway.
    """
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from melp_ray import hf  # noqa: F401  (registers model_type "melp_ray")


_register_with_transformers()
