"""Report-generation metrics: BLEU-1/BLEU-4, ROUGE-L and METEOR from maintained packages.

Generated reports are scored against the reference reports of the same records:

* tokens: ``rouge_score``'s default tokenizer (lower-case, words = runs of letters and
  digits; punctuation dropped), the same tokens for every metric;
* BLEU-1 and BLEU-4: ``nltk.translate.bleu_score.corpus_bleu`` (one reference per report,
  weights (1,) and (1/4,)*4, no smoothing: corpus-level n-gram counts, brevity penalty);
* ROUGE-L: ``rouge_score.rouge_scorer`` F-measure per report, averaged;
* METEOR: ``nltk.translate.meteor_score.meteor_score`` per report, averaged. It needs
  NLTK's WordNet data for its synonym stage; NLTK fetches it from the internet
  (``nltk.download("wordnet")``), so where it is not installed METEOR is left out and
  ``meteor_unavailable`` says why, rather than a score without synonyms.
"""
from __future__ import annotations

from collections.abc import Sequence

METEOR_MISSING = ("METEOR needs NLTK's WordNet data, which is not installed here "
                  "(python -c \"import nltk; nltk.download('wordnet')\" where the internet "
                  "can be reached, or set NLTK_DATA to a folder holding corpora/wordnet)")


def tokenize(text: str) -> list[str]:
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=False).tokenize(text)


def wordnet_available() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            return False
    return True


def bleu(hypotheses: Sequence[list[str]], references: Sequence[list[str]], n: int) -> float:
    """Corpus BLEU-n with uniform weights over 1..n-grams, one reference per hypothesis."""
    from nltk.translate.bleu_score import corpus_bleu

    return float(corpus_bleu([[r] for r in references], list(hypotheses),
                             weights=tuple([1.0 / n] * n)))


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge_score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return float(sum(scores) / len(scores))


def meteor(hypotheses: Sequence[list[str]], references: Sequence[list[str]]) -> float:
    """Mean METEOR (nltk, WordNet synonyms); requires ``wordnet_available()``."""
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([ref], hyp) for hyp, ref in zip(hypotheses, references)]
    return float(sum(scores) / len(scores))


def generation_metrics(generated: Sequence[str], references: Sequence[str]) -> dict:
    """BLEU-1, BLEU-4, ROUGE-L and (when WordNet is installed) METEOR of paired texts."""
    if len(generated) != len(references) or not generated:
        raise ValueError(f"need as many generated as reference reports (> 0), got "
                         f"{len(generated)} and {len(references)}")
    hyp_tokens = [tokenize(t) for t in generated]
    ref_tokens = [tokenize(t) for t in references]
    result = {"bleu1": bleu(hyp_tokens, ref_tokens, 1), "bleu4": bleu(hyp_tokens, ref_tokens, 4),
              "rouge_l": rouge_l(generated, references), "n_pairs": len(generated)}
    if wordnet_available():
        result["meteor"] = meteor(hyp_tokens, ref_tokens)
    else:
        result["meteor"] = None
        result["meteor_unavailable"] = METEOR_MISSING
    return result
