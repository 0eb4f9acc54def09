"""The Hugging Face configuration of an exported MELP (``config.json``).

This module is also shipped, as it is, as ``configuration_melp_ray.py`` in every exported
folder (``melp_ray.hub.custom_code``): it may import only the standard library and transformers.
"""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

# Not "melp": that name may be taken by the official MELP release's own custom code.
MODEL_TYPE = "melp_ray"


class MELPHFConfig(PreTrainedConfig):
    """Holds the MELP ModelConfig (as a dict) plus what an input must look like."""

    model_type = MODEL_TYPE

    def __init__(self, melp: dict[str, Any] | None = None, sample_rate: int | None = None,
                 seconds: float | None = None, text_subfolder: str | None = None,
                 leads: list[str] | None = None, **kwargs):
        self.melp = dict(melp or {})          # ModelConfig.to_dict()
        self.sample_rate = sample_rate        # Hz the ECG encoder was trained on
        self.seconds = seconds                # length of a training record
        self.text_subfolder = text_subfolder  # text tower lives here, relative to the folder
        self.leads = list(leads) if leads else None  # the lead order encode_ecg expects
        super().__init__(**kwargs)
