"""Report-generation metrics against hand-computed values and the packages' own calls."""
from __future__ import annotations

import math

import pytest

from melp_ray.eval.generation import (METEOR_MISSING, generation_metrics, tokenize,
                                      wordnet_available)

REFERENCES = ["Sinus rhythm. Normal ECG.", "Atrial fibrillation with rapid ventricular response."]
GENERATED = ["sinus rhythm", "atrial fibrillation, ventricular response rapid."]


def test_tokens_are_lower_case_words_without_punctuation():
    assert tokenize("Sinus rhythm. Normal ECG.") == ["sinus", "rhythm", "normal", "ecg"]


def test_identical_reports_score_one():
    result = generation_metrics(REFERENCES, REFERENCES)
    assert result["bleu1"] == pytest.approx(1.0)
    assert result["bleu4"] == pytest.approx(1.0)
    assert result["rouge_l"] == pytest.approx(1.0)


def test_hand_computed_values():
    # One pair: 2 of 4 reference words, both right. BLEU-1 = BP * 1 = exp(1 - 4/2);
    # ROUGE-L: LCS 2, precision 1, recall 1/2, F = 2/3. BLEU-4: no 3-gram, so 0.
    result = generation_metrics(["sinus rhythm"], ["Sinus rhythm. Normal ECG."])
    assert result["bleu1"] == pytest.approx(math.exp(-1))
    assert result["bleu4"] == pytest.approx(0.0)
    assert result["rouge_l"] == pytest.approx(2 / 3)
    assert result["n_pairs"] == 1


def test_metrics_equal_the_packages_own_values():
    from nltk.translate.bleu_score import corpus_bleu
    from rouge_score import rouge_scorer

    result = generation_metrics(GENERATED, REFERENCES)
    hyps = [tokenize(t) for t in GENERATED]
    refs = [[tokenize(t)] for t in REFERENCES]
    assert result["bleu1"] == pytest.approx(corpus_bleu(refs, hyps, weights=(1.0,)))
    assert result["bleu4"] == pytest.approx(corpus_bleu(refs, hyps,
                                                        weights=(0.25, 0.25, 0.25, 0.25)))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(scorer.score(r, g)["rougeL"].fmeasure
                   for g, r in zip(GENERATED, REFERENCES)) / 2
    assert result["rouge_l"] == pytest.approx(expected)
    assert 0 < result["bleu4"] < result["bleu1"] < 1


def test_meteor_is_computed_or_left_out_with_the_reason():
    result = generation_metrics(GENERATED, REFERENCES)
    if wordnet_available():
        from nltk.translate.meteor_score import meteor_score

        expected = sum(meteor_score([tokenize(r)], tokenize(g))
                       for g, r in zip(GENERATED, REFERENCES)) / 2
        assert result["meteor"] == pytest.approx(expected)
    else:
        assert result["meteor"] is None
        assert result["meteor_unavailable"] == METEOR_MISSING


def test_unpaired_texts_are_an_error():
    with pytest.raises(ValueError, match="as many generated as reference"):
        generation_metrics(["a"], ["a", "b"])
