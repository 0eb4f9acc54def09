"""Checkpoint consolidation, Hugging Face export and object-store URIs, on real tiny runs.

Two real Ray Train + DeepSpeed pretraining runs (2 workers, 6 steps; ``tiny_runs`` in
conftest, shared with the pretraining tests) are made once per session:
ZeRO-2 into a local folder, ZeRO-3 into a ``file://`` URI. The URI goes through
``pyarrow.fs.FileSystem.from_uri`` exactly like ``s3://``/``gs://`` do (in Ray Train and
in ``melp_ray.utils.storage``), with the local disk standing in for the bucket.

Each run also saves its *live* weights at the end of training (gathered from the
DeepSpeed engine on every rank, not read from the checkpoint files), so the weights
rebuilt from the checkpoint are checked against an independent source.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from melp_ray.utils import storage
from model_fixture import REFUSE_MELP_RAY

REPORTS = ["sinus rhythm. normal ecg.", "atrial fibrillation with rapid ventricular response.",
           "left bundle branch block."]


@pytest.fixture(scope="module")
def runs(tiny_runs) -> dict:
    """{"zero2": (summary, live_weights), "zero3": ..., "bucket": path}: conftest's two runs."""
    return tiny_runs


def _embeddings(model, ecg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if hasattr(model, "encode_text") and not hasattr(model, "encode_reports"):
            return model.encode_ecg(ecg), model.encode_text(REPORTS)     # MELPHFModel
        return model.encode_ecg(ecg), model.encode_reports(REPORTS)      # MELP


@pytest.fixture(scope="module")
def ecg() -> torch.Tensor:
    """Three real bundled PTB-XL records, preprocessed as in training (100 Hz, 10 s, [0, 1])."""
    import numpy as np
    from melp_ray.data.sources import bundled_root, list_records
    from melp_ray.data.records import load_signal
    from melp_ray.data.records import minmax_normalise

    root = bundled_root()
    refs = list_records("ptb-xl", root, limit=3, sample_rate=100)
    signals = [minmax_normalise(load_signal(r, root, 100, 10.0)) for r in refs]
    return torch.from_numpy(np.stack(signals).astype("float32"))


@pytest.mark.parametrize("key", ["zero2", "zero3"])
def test_consolidated_weights_equal_live_weights(runs, key):
    from melp_ray.hub.checkpoint import consolidated_state_dict

    summary, live = runs[key]
    state = consolidated_state_dict(summary["last_checkpoint"])
    assert set(state) == set(live)
    for name, tensor in state.items():
        assert tensor.dtype == live[name].dtype
        assert torch.equal(tensor, live[name]), name
    # The run really trained: the live weights moved away from the seeded initialisation.
    from melp_ray.model import MELP
    from melp_ray.hub.checkpoint import checkpoint_config
    from melp_ray.config import model_config_from_dict

    torch.manual_seed(0)
    init = MELP(model_config_from_dict(checkpoint_config(summary["last_checkpoint"])["model"]))
    assert not torch.equal(init.state_dict()["beat_proj.weight"], state["beat_proj.weight"])


@pytest.mark.parametrize("key", ["zero2", "zero3"])
def test_export_round_trip_gives_identical_embeddings(runs, key, tmp_path, ecg):
    import melp_ray.hub.hf  # noqa: F401  (registers model_type "melp_ray")
    from safetensors.torch import load_file
    from transformers import AutoModel
    from melp_ray.hub.checkpoint import load_model_from_checkpoint, model_from_state_dict
    from melp_ray.hub.export import export
    from melp_ray.hub.hf import MELPHFModel

    summary, live = runs[key]
    out = tmp_path / "hf"
    info = export(summary["last_checkpoint"], str(out))
    assert info["step"] == 6

    # Weights: a plain safetensors file, every MELP tensor, fp32, equal to the live ones.
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == {f"melp.{k}" for k in live}
    for name, tensor in live.items():
        assert torch.equal(weights[f"melp.{name}"], tensor), name

    # Self-contained: no path outside the folder, text tower rebuilt, not downloaded.
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "melp_ray"
    assert config["auto_map"] == {"AutoConfig": "configuration_melp_ray.MELPHFConfig",
                                  "AutoModel": "modeling_melp_ray.MELPHFModel"}
    assert config["leads"][:6] == ["I", "II", "III", "aVR", "aVL", "aVF"]
    assert (out / "modeling_melp_ray.py").is_file() and (out / "configuration_melp_ray.py").is_file()
    assert config["melp"]["text_model"] == "text_model" and not config["melp"]["text_pretrained"]
    assert (out / "text_model" / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "text_model" / "tokenizer.json").is_file()

    hf_model = AutoModel.from_pretrained(str(out))
    assert isinstance(hf_model, MELPHFModel) and not hf_model.training
    ecg_hf, text_hf = _embeddings(hf_model, ecg)

    from_checkpoint = load_model_from_checkpoint(summary["last_checkpoint"])
    cfg = from_checkpoint.cfg
    from_live = model_from_state_dict(cfg, live)
    for reference in (from_checkpoint, from_live):
        ecg_ref, text_ref = _embeddings(reference, ecg)
        torch.testing.assert_close(ecg_hf, ecg_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(text_hf, text_ref, rtol=0, atol=1e-6)
    assert ecg_hf.shape == (3, cfg.embed_dim) and text_hf.shape == (len(REPORTS), cfg.embed_dim)
    # Not trivially equal: different records give different embeddings.
    assert not torch.allclose(ecg_hf[0], ecg_hf[1])


def test_export_cli_from_run_folder_writes_model_card(runs, tmp_path):
    from melp_ray.export import main

    summary, _ = runs["zero2"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"zeroshot": {"ptbxl_super_auroc": 0.6123}}))
    out = tmp_path / "hf"
    assert main(["--checkpoint", summary["run_dir"], "--out", str(out),
                 "--eval-results", str(results)]) == 0
    card = (out / "README.md").read_text()
    assert "zeroshot/ptbxl_super_auroc | 0.6123" in card
    assert os.path.basename(summary["last_checkpoint"]) in card      # latest checkpoint picked
    assert "zero_stage: 2" in card and "max_steps: 6" in card          # training config
    assert "total |" in card                                           # losses from summary.json
    assert "trust_remote_code=True" in card and "## Citation" in card and "2506.21803" in card
    assert "## Licence" in card and "Apache-2.0" in card
    assert "training /" in card and "validation records" in card       # data counts from summary

    assert main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


# A child process that cannot import melp_ray: only torch + transformers + the folder's code.
_LOAD_WITHOUT_MELP_RAY = REFUSE_MELP_RAY + """
import numpy as np
from transformers import AutoModel
folder, inputs, out = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
ecg = np.load(inputs)
prompts = json.loads(sys.argv[4])
reports = json.loads(sys.argv[5])
np.savez(out, ecg_emb=model.encode_ecg(ecg).numpy(), text_emb=model.encode_text(reports).numpy(),
         zero_shot=model.zero_shot_scores(ecg, prompts).numpy())
print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}",
                  "training": model.training, "generated": model.generate(ecg, max_new_tokens=8),
                  "melp_ray_modules": [m for m in sys.modules if m.startswith("melp_ray")]}))
"""

PROMPTS = {"NORM": ["normal ecg", "sinus rhythm"], "AFIB": ["atrial fibrillation"],
           "LBBB": ["left bundle branch block"]}


@pytest.fixture(scope="module")
def loaded_without_melp_ray(runs, tmp_path_factory, ecg) -> dict:
    """Export the ZeRO-2 run, load it in a child process where melp_ray cannot be imported."""
    import subprocess
    import sys
    import numpy as np
    from melp_ray.hub.export import export

    tmp = tmp_path_factory.mktemp("remote_code")
    summary, _ = runs["zero2"]
    export(summary["last_checkpoint"], str(tmp / "hf"))
    np.save(tmp / "ecg.npy", ecg.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp / "hf_home")          # transformers copies the code under here
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_MELP_RAY, str(tmp / "hf"), str(tmp / "ecg.npy"),
         str(tmp / "out.npz"), json.dumps(PROMPTS), json.dumps(REPORTS)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {"info": info, "arrays": dict(np.load(tmp / "out.npz")),
            "checkpoint": summary["last_checkpoint"]}


def test_exported_folder_loads_with_only_transformers(loaded_without_melp_ray, ecg):
    """trust_remote_code: the folder's own code gives melp_ray's embeddings and zero-shot scores."""
    from melp_ray.hub.checkpoint import load_model_from_checkpoint
    from melp_ray.eval.zero_shot import prompt_embeddings, zero_shot_scores

    info, arrays = loaded_without_melp_ray["info"], loaded_without_melp_ray["arrays"]
    assert info["melp_ray_modules"] == [] and not info["training"]
    assert info["class"].startswith("transformers_modules.") and \
        info["class"].endswith("modeling_melp_ray.MELPHFModel")
    model = load_model_from_checkpoint(loaded_without_melp_ray["checkpoint"])
    ecg_ref, text_ref = _embeddings(model, ecg)
    torch.testing.assert_close(torch.from_numpy(arrays["ecg_emb"]), ecg_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(arrays["text_emb"]), text_ref, rtol=0, atol=1e-6)
    assert not torch.allclose(ecg_ref[0], ecg_ref[1])
    # Zero-shot scores as `python -m melp_ray.evaluate --mode zeroshot` computes them.
    with torch.no_grad():
        classes = prompt_embeddings(lambda texts: model.encode_reports(texts).numpy(),
                                    list(PROMPTS.values()))
    expected = zero_shot_scores(ecg_ref.numpy(), classes)
    assert arrays["zero_shot"].shape == (3, len(PROMPTS))
    assert abs(arrays["zero_shot"] - expected).max() < 1e-5


def test_exported_folder_generates_reports_with_only_transformers(loaded_without_melp_ray, ecg):
    from melp_ray.hub.checkpoint import load_model_from_checkpoint

    generated = loaded_without_melp_ray["info"]["generated"]
    model = load_model_from_checkpoint(loaded_without_melp_ray["checkpoint"])
    assert generated == model.generate(ecg, max_new_tokens=8)
    assert len(generated) == 3 and all(isinstance(text, str) for text in generated)


def test_generated_code_refuses_what_would_break_it(monkeypatch):
    from melp_ray.hub import custom_code as hub_code

    modeling = hub_code.render_modeling()
    assert "import melp_ray" not in modeling and "from melp_ray" not in modeling
    assert "class MELP(nn.Module)" in modeling and "class ECGEncoder" in modeling
    # A module listed twice would define its names twice: refused, not silently shadowed.
    monkeypatch.setattr(hub_code, "MODELING_MODULES",
                        hub_code.MODELING_MODULES + ("melp_ray.model.layers",))
    with pytest.raises(hub_code.CodeGenerationError, match="redefines"):
        hub_code.render_modeling()
    # A module whose melp_ray import nothing earlier defines: refused.
    monkeypatch.setattr(hub_code, "MODELING_MODULES", ("melp_ray.model.melp",))
    with pytest.raises(hub_code.CodeGenerationError, match="no earlier module"):
        hub_code.render_modeling()


def test_run_writes_checkpoints_and_summary_to_uri_storage(runs):
    from melp_ray.hub.checkpoint import is_training_checkpoint, load_model, resolve_checkpoint

    summary, _ = runs["zero3"]
    bucket = runs["bucket"]
    assert summary["run_dir"] == f"file://{bucket}/melp/tiny-zero3"
    # The summary keeps the scheme, so the checkpoint can be found again from anywhere.
    assert summary["last_checkpoint"].startswith(f"file://{bucket}/melp/tiny-zero3/checkpoint_")
    assert storage.read_json(storage.join(summary["run_dir"], "summary.json")) == \
        json.loads(json.dumps(summary, default=str))
    assert storage.exists(storage.join(summary["run_dir"], "metrics.jsonl"))
    assert is_training_checkpoint(summary["last_checkpoint"])
    assert resolve_checkpoint(summary["run_dir"]) == summary["last_checkpoint"]
    # Everything really sits under the "bucket".
    local_ckpt = summary["last_checkpoint"][len("file://"):]
    assert os.path.isdir(os.path.join(local_ckpt, "deepspeed"))
    assert load_model(summary["run_dir"]).cfg.embed_dim > 0


def test_load_model_accepts_checkpoint_and_exported_folder(runs, tmp_path, ecg):
    from melp_ray.hub.checkpoint import load_model
    from melp_ray.hub.export import export
    from melp_ray.model import MELP

    summary, _ = runs["zero2"]
    export(summary["last_checkpoint"], str(tmp_path / "hf"))
    a = load_model(summary["last_checkpoint"])
    b = load_model(str(tmp_path / "hf"))
    assert isinstance(a, MELP) and isinstance(b, MELP)
    for x, y in zip(_embeddings(a, ecg), _embeddings(b, ecg)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_shared_tensors_are_exported_and_reload(tmp_path):
    """Tied parameters: safetensors refuses shared memory; the export de-aliases them."""
    import melp_ray.hub.hf  # noqa: F401
    from safetensors.torch import load_file
    from transformers import AutoModel
    from melp_ray.hub.hf import MELPHFModel
    from melp_ray.model import MELP
    from melp_ray.model.config import model_config_from_preset

    torch.manual_seed(0)
    melp = MELP(model_config_from_preset("tiny")).eval()
    emb = melp.text.backbone.get_input_embeddings()
    assert melp.decoder.text_projection.weight.shape == emb.weight.shape
    melp.decoder.text_projection.weight = emb.weight                      # tie (vocab x 64 both)
    MELPHFModel.from_melp(melp, sample_rate=100, seconds=10.0).save_pretrained(tmp_path)

    weights = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(weights["melp.decoder.text_projection.weight"],
                       weights["melp.text.backbone.embeddings.word_embeddings.weight"])
    loaded = AutoModel.from_pretrained(str(tmp_path))
    for name, tensor in melp.state_dict().items():
        assert torch.equal(loaded.melp.state_dict()[name], tensor), name


def test_exported_model_config_builds_the_saved_architecture(tmp_path):
    """What `evaluate --random-init` and `train.init_from` read from an export folder."""
    from melp_ray.hub.hf import MELPHFModel, exported_model_config
    from melp_ray.model import MELP
    from melp_ray.model.config import model_config_from_preset

    torch.manual_seed(0)
    melp = MELP(model_config_from_preset("tiny"))
    MELPHFModel.from_melp(melp, sample_rate=100, seconds=10.0).save_pretrained(tmp_path / "hf")
    cfg = exported_model_config(str(tmp_path / "hf"))
    assert cfg.text_model == str(tmp_path / "hf" / "text_model") and not cfg.text_pretrained
    rebuilt = MELP(cfg).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == \
        {k: v.shape for k, v in melp.state_dict().items()}


def test_storage_uri_helpers():
    assert storage.join("s3://b/p?endpoint_override=h:9000", "run", "summary.json") == \
        "s3://b/p/run/summary.json?endpoint_override=h:9000"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.to_uri("s3://b/runs", "b/runs/x/checkpoint_1") == "s3://b/runs/x/checkpoint_1"
    assert storage.to_uri("file:///tmp/r", "/tmp/r/c") == "file:///tmp/r/c"
    assert storage.to_uri("/tmp/r", "/tmp/r/c") == "/tmp/r/c"
