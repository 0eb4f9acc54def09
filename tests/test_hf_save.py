"""``MELPHFModel.save_pretrained`` is the one writer of a Hugging Face folder; the export CLI's
argument errors and model card. Tiny models built in-process (no Ray run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel

from melp_ray.export import main as export_main
from melp_ray.hub.export import model_card
from melp_ray.hub.hf import MELPHFModel
from melp_ray.model import MELP
from melp_ray.model.config import model_config_from_preset
from model_fixture import REFUSE_MELP_RAY

# Run with `python -I` (no PYTHONPATH, no cwd, no user site) and a finder that refuses
# melp_ray, which the venv still has installed (editable): only the folder's own code loads.
_LOAD_WITHOUT_MELP_RAY = REFUSE_MELP_RAY + """
try:
    import melp_ray  # noqa
    importable = True
except ImportError:
    importable = False
import numpy as np
from transformers import AutoModel
folder, inputs, out = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
np.save(out, model.encode_ecg(np.load(inputs)).numpy())
print(json.dumps({"melp_ray_importable": importable, "class": type(model).__module__,
                  "melp_ray_modules": [m for m in sys.modules if m.startswith("melp_ray")]}))
"""


@pytest.fixture(scope="module")
def tiny_hf() -> MELPHFModel:
    torch.manual_seed(0)
    return MELPHFModel.from_melp(MELP(model_config_from_preset("tiny")).eval(),
                                 sample_rate=100, seconds=10.0)


def test_save_pretrained_of_a_reloaded_model_loads_without_melp_ray(tiny_hf, tmp_path):
    """Save, reload through melp_ray's class (as training code does), save again: the second
    folder must load in a process that cannot import melp_ray, with the same outputs."""
    tiny_hf.save_pretrained(tmp_path / "first")
    reloaded = AutoModel.from_pretrained(str(tmp_path / "first"))
    assert isinstance(reloaded, MELPHFModel)
    reloaded.save_pretrained(tmp_path / "second")
    saved = sorted(os.listdir(tmp_path / "second"))
    for name in ("config.json", "configuration_melp_ray.py", "modeling_melp_ray.py",
                 "model.safetensors", "text_model", "tokenizer.json"):
        assert name in saved, saved
    assert json.loads((tmp_path / "second" / "config.json").read_text())["auto_map"]["AutoModel"] \
        == "modeling_melp_ray.MELPHFModel"

    ecg = torch.rand(2, 12, 1000, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "ecg.npy", ecg.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")       # transformers copies the code under here
    done = subprocess.run(
        [sys.executable, "-I", "-c", _LOAD_WITHOUT_MELP_RAY, str(tmp_path / "second"),
         str(tmp_path / "ecg.npy"), str(tmp_path / "out.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info == {"melp_ray_importable": False, "melp_ray_modules": [],
                    "class": info["class"]} and "modeling_melp_ray" in info["class"]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")),
                               tiny_hf.encode_ecg(ecg), rtol=0, atol=1e-6)


def test_export_of_a_file_exits_2_naming_what_it_expects(tmp_path, capsys):
    not_a_folder = tmp_path / "model.safetensors"
    not_a_folder.write_bytes(b"x")
    assert export_main(["--checkpoint", str(not_a_folder), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "expected a run folder or a checkpoint folder" in err and "Traceback" not in err


def test_model_card_carries_eval_results_as_model_index(tmp_path):
    train_config = {"model": {"preset": "tiny"}, "data": {"root": "s3://b/shards/ptbxl"},
                    "train": {"max_steps": 6}, "deepspeed": {"zero_stage": 2}}
    summary = {"validation": {"val_loss": 1.25}}
    card = model_card("ckpt", 6, train_config, summary,
                      {"zeroshot": {"ptbxl_super_auroc": 0.6123}}, n_params=10)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers" and "custom_code" in loaded.data.tags
    results = {(r.task_type, r.metric_name, r.dataset_split): r.metric_value
               for r in loaded.data.eval_results}
    assert results == {("zeroshot", "zeroshot/ptbxl_super_auroc", None): 0.6123,
                       ("feature-extraction", "val_loss", "validation"): 1.25}
    assert {r.dataset_type for r in loaded.data.eval_results} == {"ptbxl"}
    assert "zeroshot/ptbxl_super_auroc | 0.6123" in loaded.text and "zero_stage: 2" in loaded.text
