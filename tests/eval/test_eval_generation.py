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


# ---------------------------------------------------------------- METEOR with a WordNet

WORDNET_HEADER = "  1 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.\n"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def write_wordnet(root, noun_synsets: list[list[str]]) -> None:
    """A WordNet database in NLTK's layout (``root/corpora/wordnet``) holding only these
    noun synsets: the real files (data.*, index.*, lexnames, *.exc), written here because
    NLTK's own WordNet is downloaded from the internet. Synset offsets are byte offsets."""
    folder = root / "corpora" / "wordnet"
    folder.mkdir(parents=True)
    for pos, name in POS_FILES.items():
        lines, index = [WORDNET_HEADER], []
        offset = len(WORDNET_HEADER.encode())
        for lemmas in noun_synsets if pos == "n" else []:
            words = " ".join(f"{lemma} 0" for lemma in lemmas)
            line = f"{offset:08d} 03 {pos} {len(lemmas):02x} {words} 000 | a test synset  \n"
            index += [(lemma, offset) for lemma in lemmas]
            lines.append(line)
            offset += len(line.encode())
        (folder / f"data.{name}").write_text("".join(lines))
        (folder / f"index.{name}").write_text(WORDNET_HEADER + "".join(
            f"{lemma} {pos} 1 0 1 0 {o:08d}  \n" for lemma, o in sorted(index)))
        (folder / f"{name}.exc").write_text("")
    (folder / "lexnames").write_text("".join(f"{i:02d}\tlex.{i}\t1\n" for i in range(4)))
    for name in ("cntlist.rev", "index.sense"):
        (folder / name).write_text("")


def test_meteor_with_wordnet_installed_uses_its_synonyms(tmp_path):
    """Where WordNet is installed (NLTK_DATA), METEOR is computed: equal to nltk's own
    meteor_score, and a synonym WordNet knows counts as a match (BLEU/ROUGE miss it)."""
    import json
    import os
    import subprocess
    import sys

    write_wordnet(tmp_path, [["heart", "ticker"]])
    code = ("import json; from melp_ray.eval.generation import generation_metrics, tokenize\n"
            "from nltk.translate.meteor_score import meteor_score\n"
            "gen, ref = ['rapid ticker', 'rapid lung'], ['rapid heart', 'rapid heart']\n"
            "print(json.dumps({'ours': generation_metrics(gen, ref),\n"
            "  'nltk': [meteor_score([tokenize(r)], tokenize(g)) for g, r in zip(gen, ref)]}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "NLTK_DATA": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    synonym, other = out["nltk"]
    assert out["ours"]["meteor"] == pytest.approx((synonym + other) / 2)
    assert "meteor_unavailable" not in out["ours"]
    assert synonym > other   # ticker ~ heart only through WordNet (no shared stem); lung: nothing
