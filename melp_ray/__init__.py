"""melp_ray: MELP (multi-scale ECG-language pretraining) on Ray Data, Ray Train, Ray Tune and DeepSpeed."""
__version__ = "0.1.0"
