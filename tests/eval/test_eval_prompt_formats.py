"""Prompt files in the reference's CKEPE format and in ours: detection, scoring, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from melp_ray.data.ptbxl import SUPERCLASSES
from melp_ray.eval_plan.plan import EvalError, build_plan
from melp_ray.text.prompts import (MissingPromptError, load_prompt_file, prompt_file_format,
                                   resolve_prompts)
from melp_ray.eval.zero_shot import prompt_embeddings

# Written here in the CKEPE layout (class code -> one string of comma-separated phrases).
CKEPE = {
    "NORM": "Normal ECG, normal electrocardiogram, Sinus rhythm.",
    "MI": "myocardial infarction, Inferior MI, anterior MI.",
    "STTC": "ST/T change, non-specific ST changes.",
    "CD": "conduction disturbance, RBBB, LBBB.",
    "HYP": "hypertrophy, LVH.",
}


def _write(path, data) -> str:
    path.write_text(json.dumps(data) if path.suffix == ".json" else data)
    return str(path)


def test_ckepe_file_is_detected_and_each_class_is_one_lower_cased_text(tmp_path):
    path = _write(tmp_path / "CKEPE_prompt.json", CKEPE)
    assert prompt_file_format(path) == "ckepe"
    prompts = load_prompt_file(path)
    assert list(prompts) == list(CKEPE)
    assert prompts["NORM"] == ["normal ecg, normal electrocardiogram, sinus rhythm."]
    assert all(len(p) == 1 for p in prompts.values())  # commas are not split on


def test_our_formats_are_not_taken_for_ckepe(tmp_path):
    listed = _write(tmp_path / "p.json", {"NORM": ["Normal ECG", "sinus rhythm"], "MI": "MI"})
    assert prompt_file_format(listed) == "melp_ray"
    assert load_prompt_file(listed)["NORM"] == ["Normal ECG", "sinus rhythm"]
    yaml_file = _write(tmp_path / "p.yaml", "NORM: Normal ECG\n")
    assert prompt_file_format(yaml_file) == "melp_ray"
    assert load_prompt_file(yaml_file)["NORM"] == ["Normal ECG"]  # used as written
    # The flag overrides detection: a string-only JSON read as ours keeps its case.
    strings = _write(tmp_path / "s.json", {"NORM": "Normal ECG"})
    assert load_prompt_file(strings, "melp_ray")["NORM"] == ["Normal ECG"]
    assert load_prompt_file(strings, "ckepe")["NORM"] == ["normal ecg"]


def test_ckepe_class_embedding_is_the_encoding_of_the_whole_string():
    """What the reference computes: encode([description.lower()]), L2-normalised."""
    def encode(texts):  # deterministic text -> vector, different for different strings
        return np.stack([np.array([len(t), t.count(","), sum(map(ord, t)) % 97, 1.0])
                         for t in texts])
    prompts = [[CKEPE[c].lower()] for c in SUPERCLASSES]   # what load_prompt_file gives
    emb = prompt_embeddings(encode, prompts)
    for i, cls in enumerate(SUPERCLASSES):
        expected = encode([CKEPE[cls].lower()])[0]
        np.testing.assert_allclose(emb[i], expected / np.linalg.norm(expected))


def test_ckepe_file_must_name_every_class_no_default_fallback(tmp_path):
    partial = {k: v for k, v in CKEPE.items() if k != "HYP"}
    path = _write(tmp_path / "CKEPE_prompt.json", partial)
    with pytest.raises(MissingPromptError, match=r"\['HYP'\] in CKEPE file"):
        resolve_prompts(SUPERCLASSES, {"HYP": "hypertrophy"}, path)
    # Our format still falls back to the defaults per class.
    ours = _write(tmp_path / "ours.yaml", "NORM: normal ecg\n")
    assert resolve_prompts(SUPERCLASSES, {c: c.lower() for c in SUPERCLASSES}, ours)[4] == \
        ["hyp"]


def test_bad_prompt_files_name_the_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"NORM": "normal ecg",\n  "MI": }')
    with pytest.raises(ValueError, match="broken.json: line 2 column 9"):
        load_prompt_file(broken)
    listed = _write(tmp_path / "l.json", {"NORM": ["a", "b"]})
    with pytest.raises(ValueError, match="class 'NORM' must map to one non-empty description"):
        load_prompt_file(listed, "ckepe")
    with pytest.raises(ValueError, match="unknown prompt format"):
        load_prompt_file(listed, "clip")


def test_plan_uses_a_ckepe_file_in_class_order(plan_args, tmp_path):
    path = _write(tmp_path / "CKEPE_prompt.json", dict(reversed(list(CKEPE.items()))))
    plan = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-6", "--prompts", path))
    assert plan.class_names == SUPERCLASSES
    assert plan.prompts == [[CKEPE[c].lower()] for c in SUPERCLASSES]
    assert plan.settings["prompt_format"] == "ckepe"


def test_plan_names_the_class_missing_from_a_ckepe_file(plan_args, tmp_path):
    path = _write(tmp_path / "CKEPE_prompt.json", {k: v for k, v in CKEPE.items() if k != "CD"})
    with pytest.raises(EvalError, match=r"no zero-shot prompt for classes \['CD'\]"):
        build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-6", "--prompts", path))
    with pytest.raises(EvalError, match="--prompt-format needs --prompts"):
        build_plan(plan_args("--mode", "zeroshot", "--prompt-format", "ckepe"))
