"""export --push-to-hub: the Hub client is called with the whole folder, private by default."""
from __future__ import annotations

import pytest
from huggingface_hub import HfApi

from melp_ray.hub.push import push_to_hub


def export_folder(tmp_path):
    folder = tmp_path / "melp-hf"
    folder.mkdir()
    for name in ("README.md", "config.json", "model.safetensors", "modeling_melp.py"):
        (folder / name).write_text(name)
    return folder


@pytest.fixture
def hub_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create_repo", repo_id, kw)) or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    return calls


@pytest.mark.parametrize("private", [True, False])
def test_push_uploads_the_export_folder(tmp_path, hub_calls, private):
    folder = export_folder(tmp_path)
    url = push_to_hub(str(folder), "org/melp-small", private=private)
    assert url == "https://huggingface.co/org/melp-small"
    (_, repo, create), (_, upload) = hub_calls
    assert repo == "org/melp-small" and create["private"] is private and create["repo_type"] == "model"
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "org/melp-small"
    assert {"README.md", "modeling_melp.py"} <= {p.name for p in folder.iterdir()}


def test_a_folder_without_card_or_code_is_refused(tmp_path, hub_calls):
    folder = export_folder(tmp_path)
    (folder / "modeling_melp.py").unlink()
    with pytest.raises(FileNotFoundError, match="code"):
        push_to_hub(str(folder), "org/x")
    assert hub_calls == []
