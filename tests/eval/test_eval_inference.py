"""EmbeddingExtractor in-process and as a Ray Data actor pool."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from melp_ray.eval.inference import (EmbeddingExtractor, collect_columns, embed_in_this_process,
                                     extract_embeddings)


class TinyModel(torch.nn.Module):
    """Same method names as MELP, on a (B, 12, T) ECG and a list of texts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(12, 4)

    def ecg_features(self, ecg):
        return ecg.mean(dim=-1)

    def encode_ecg(self, ecg):
        return torch.nn.functional.normalize(self.proj(self.ecg_features(ecg)), dim=-1)

    def encode_reports(self, texts):
        return torch.tensor([[float(len(t)), 1.0, 0.0, 0.0] for t in texts])


def seeded_linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 3)


def test_extractor_maps_numeric_and_text_columns():
    extractor = EmbeddingExtractor(TinyModel, outputs={
        "ecg_emb": ("encode_ecg", "ecg"), "ecg_feat": ("ecg_features", "ecg"),
        "text_emb": ("encode_reports", "report")})
    ecg = np.random.default_rng(0).normal(size=(3, 12, 50)).astype(np.float32)
    batch = {"ecg": ecg, "report": np.array(["sinus rhythm", "af", "x"], dtype=object),
             "record_id": np.array(["a", "b", "c"])}
    out = extractor(batch)
    assert set(out) == {"record_id", "ecg_emb", "ecg_feat", "text_emb"}  # inputs dropped
    np.testing.assert_allclose(out["ecg_feat"], ecg.mean(axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["ecg_emb"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out["text_emb"][:, 0], [12, 2, 1])


def test_extractor_rejects_missing_methods_and_binary_columns():
    with pytest.raises(AttributeError, match="encode_ecg"):
        EmbeddingExtractor(torch.nn.Identity)
    extractor = EmbeddingExtractor(torch.nn.Identity, outputs={"emb": ("forward", "ecg")})
    with pytest.raises(TypeError, match="decode binary"):
        extractor({"ecg": np.array([b"\x00\x01"], dtype=object)})


def test_actor_pool_extracts_every_row_aligned_by_id(ray_local):
    """One actor pool (each start costs seconds): every row back, aligned by id, with the
    seeded model's output for its own input; --actors 0 gives the same rows and values."""
    import ray.data

    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    ds = ray.data.from_items([{"record_id": f"{i:03d}", "x": x[i]} for i in range(40)])
    pool = collect_columns(extract_embeddings(ds, seeded_linear, outputs={"emb": ("forward", "x")},
                                              batch_size=16, concurrency=1),
                           ["emb"], sort_by="record_id")
    assert list(pool["record_id"]) == [f"{i:03d}" for i in range(40)]
    with torch.inference_mode():
        expected = seeded_linear()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(pool["emb"], expected, rtol=1e-5, atol=1e-6)
    # --actors 0: the same rows and values with the model in this process.
    here = embed_in_this_process(ds, seeded_linear, {"emb": ("forward", "x")}, ["emb"],
                                 batch_size=16, sort_by="record_id")
    assert list(here["record_id"]) == list(pool["record_id"])
    np.testing.assert_allclose(here["emb"], pool["emb"], rtol=1e-6)
