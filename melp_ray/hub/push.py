"""Share an exported folder on the Hugging Face Hub (``export --push-to-hub ORG/NAME``)."""
from __future__ import annotations

import os

from huggingface_hub import HfApi


def push_to_hub(folder: str, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload an export folder as a model repository (private unless asked), whole: weights,
    config, the model card (README.md) and the custom code that ``trust_remote_code`` loads.
    Returns the repository's URL. The token: ``token``, else the Hub's own (HF_TOKEN or
    ``huggingface-cli login``)."""
    names = set(os.listdir(folder))
    missing = [n for n in ("README.md", "config.json") if n not in names]
    if missing or not any(n.endswith(".py") for n in names):
        raise FileNotFoundError(f"{folder} is not an export folder (missing {missing or 'its *.py code'})")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                      commit_message="melp_ray export")
    return str(url)
