"""melp_ray: MELP (multi-scale ECG-language pretraining) on Ray Data, Ray Train, Ray Tune and DeepSpeed.

``import melp_ray`` imports nothing heavy: every Ray process that unpickles a melp_ray config
or function imports this package, and transformers alone costs seconds there. ``import
melp_ray.hub.hf`` registers MELP with transformers' Auto classes.
"""
__version__ = "0.1.0"
