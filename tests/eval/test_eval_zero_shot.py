"""Prompts from the real scp_statements.csv, prompt files, and zero-shot scoring."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from melp_ray.data.physionet_labels import CPSC2018_CLASSES
from melp_ray.text.prompts import (PTBXL_SUPERCLASS_PROMPTS, MissingPromptError,
                                   cpsc2018_prompts, load_prompt_file,
                                   ptbxl_prompts, resolve_prompts)
from melp_ray.eval.zero_shot import evaluate_zero_shot, prompt_embeddings, zero_shot_scores


@pytest.fixture(scope="module")
def scp_csv(shared_ptbxl):
    return shared_ptbxl / "scp_statements.csv"


def _ptbxl_label_sets(scp_csv) -> dict[str, list[str]]:
    table = pd.read_csv(scp_csv, index_col=0)
    return {
        "super": sorted(table["diagnostic_class"].dropna().unique()),
        "sub": sorted(table["diagnostic_subclass"].dropna().unique()),
        "form": sorted(table.index[table["form"] == 1]),
        "rhythm": sorted(table.index[table["rhythm"] == 1]),
    }


def test_ptbxl_prompts_cover_every_label_set(scp_csv):
    sets = _ptbxl_label_sets(scp_csv)
    assert [len(sets[k]) for k in ("super", "sub", "form", "rhythm")] == [5, 23, 19, 12]
    for classes in sets.values():
        prompts = ptbxl_prompts(classes, scp_csv)
        assert len(prompts) == len(classes)
        assert all(p and all(text.strip() for text in p) for p in prompts)


def test_ptbxl_prompts_use_official_descriptions_in_class_order(scp_csv):
    prompts = ptbxl_prompts(["AFIB", "MI", "IRBBB", "NORM"], scp_csv)
    # SCP codes get their official description; superclass names (MI, NORM) get our
    # descriptive prompt lists, the same ones pretraining validates with.
    assert prompts == [["atrial fibrillation"], PTBXL_SUPERCLASS_PROMPTS["MI"],
                       ["incomplete right bundle branch block"], PTBXL_SUPERCLASS_PROMPTS["NORM"]]


def test_missing_class_is_an_error_naming_it(scp_csv):
    with pytest.raises(MissingPromptError, match="NOT_A_CLASS"):
        ptbxl_prompts(["NORM", "NOT_A_CLASS"], scp_csv)


def test_cpsc2018_prompts_cover_the_nine_classes():
    prompts = cpsc2018_prompts()
    assert len(prompts) == len(CPSC2018_CLASSES) == 9


def test_prompt_files_yaml_and_json_override_defaults(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "AF:\n  - atrial fibrillation\n  - irregularly irregular rhythm\nNORM: sinus rhythm\n")
    (tmp_path / "p.json").write_text(json.dumps({"AF": "af"}))
    assert load_prompt_file(tmp_path / "p.json") == {"AF": ["af"]}
    prompts = resolve_prompts(["NORM", "AF", "PVC"], defaults={"PVC": "pvc", "NORM": "x"},
                              prompt_file=tmp_path / "p.yaml")
    assert prompts == [["sinus rhythm"], ["atrial fibrillation", "irregularly irregular rhythm"],
                       ["pvc"]]
    with pytest.raises(MissingPromptError, match="STE"):
        resolve_prompts(["STE"], prompt_file=tmp_path / "p.yaml")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_prompt_file(tmp_path / "bad.yaml")


def test_zero_shot_scores_are_cosines():
    rng = np.random.default_rng(0)
    ecg, prompts = rng.normal(size=(6, 4)), rng.normal(size=(3, 4))
    expected = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in prompts] for a in ecg]
    np.testing.assert_allclose(zero_shot_scores(ecg, prompts), expected, rtol=1e-12)


def test_prompt_list_embedding_is_normalised_mean():
    vocab = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [3.0, 4.0]}
    emb = prompt_embeddings(lambda texts: np.array([vocab[t] for t in texts]), [["a", "b"], ["c"]])
    np.testing.assert_allclose(emb, [[np.sqrt(0.5), np.sqrt(0.5)], [0.6, 0.8]], rtol=1e-12)


def test_evaluate_zero_shot_on_aligned_embeddings_is_perfect():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(120, 3))
    y[0], y[1] = 0, 1
    class_emb = np.eye(3, 8)  # one direction per class
    ecg_emb = y @ class_emb + 0.01 * rng.normal(size=(120, 8)) + 0.05  # off-axis offset
    result = evaluate_zero_shot(ecg_emb, class_emb, y, ["a", "b", "c"], n_bootstrap=200)
    assert result["macro_auroc"] == 1.0
    assert result["ci"][0] <= 1.0 <= result["ci"][1] + 1e-12
    assert result["scores"].shape == (120, 3) and result["skipped"] == []
