"""LongBench scoring: the per-answer metrics of the official ``metrics.py`` and the ``eval.py`` rule.

Every metric takes one prediction and one ground truth and returns a float in ``[0, 1]``; they share
the signature ``metric(prediction, ground_truth, *, all_classes=None)`` (only
:func:`classification_score` reads ``all_classes``). :func:`score_prediction` applies the official
rule on top: the first line only for the few-shot tasks, then the best score over all ground truths.

The numbers match the official implementation, quirks included (each is noted where it is kept):

* Rouge-L is the ``rouge`` package's (pltrdy, 1.0.1): summary-level union LCS over sentences split on
  ``"."`` with *sets* of words. ``rouge-score`` (Google) computes a different Rouge-L (plain token
  LCS, its own tokenizer) and gives other numbers, e.g. 0.833 instead of 0.8 for "the cat sat on the
  mat" against "the cat lay on the mat", so it is not used here. The package rebuilds each LCS
  recursively, so a "sentence" (no ".") of roughly 1000+ words raises RecursionError, which the
  official bare ``except`` turns into a score of 0; that is kept too.
* Code similarity is ``fuzzywuzzy.fuzz.ratio`` as the official environment ran it. LongBench's
  requirements install ``fuzzywuzzy`` without ``python-Levenshtein``, so ``fuzz.ratio`` falls back to
  the standard library's ``difflib.SequenceMatcher`` (greedy longest blocks, not a true LCS), rounded
  to an integer percentage. We call ``difflib`` directly with the same decorators' rules (equal
  strings score 100, an empty one 0): the same numbers with no unmaintained dependency.
  ``rapidfuzz.fuzz.ratio`` (and ``thefuzz``, and fuzzywuzzy *with* python-Levenshtein) computes the
  Indel (true LCS) ratio, which differs often: "i + 1" against "1 - i" is 20 with difflib but 40 with
  rapidfuzz. So rapidfuzz is not used.
* Chinese segmentation is ``jieba`` (``cut_all=False``), as in the official code; there is no
  maintained drop-in that segments identically.

``jieba`` and ``rouge`` are imported lazily, inside the metrics that need them. When this module was
written, every metric gave the same floats as the official ``metrics.py`` (run with rouge 1.0.1,
jieba 0.42.1 and fuzzywuzzy 0.18.0 without python-Levenshtein) on ~20,000 random English, Chinese
and code-like inputs.
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = [
    "DATASET_TO_METRIC",
    "FIRST_LINE_DATASETS",
    "LONGBENCH_DATASETS",
    "LONGBENCH_E_DATASETS",
    "Metric",
    "base_dataset",
    "classification_score",
    "code_sim_score",
    "count_score",
    "f1_score",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "score_prediction",
]

# The 21 LongBench (v1) datasets, in the order of the paper's tables.
LONGBENCH_DATASETS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)  # fmt: skip

# The 13 datasets that LongBench-E re-samples with an even length distribution (files ``<name>_e.jsonl``).
LONGBENCH_E_DATASETS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip

# Few-shot tasks whose models tend to keep generating further examples: only the first line is scored.
FIRST_LINE_DATASETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# Punctuation removed by ``normalize_zh_answer``, character for character as in the official code
# (it lists "》" but not "《"; kept as is so the numbers match).
_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)


class Metric(Protocol):
    """A LongBench metric: one prediction against one ground truth, a score in ``[0, 1]``."""

    def __call__(
        self, prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
    ) -> float: ...


# --------------------------------------------------------------------------------------------------
# Lazy imports of the optional dependencies
# --------------------------------------------------------------------------------------------------


_JIEBA_QUIETED = False


def _jieba() -> Any:
    """Import jieba; the first time, quiet its dictionary-loading messages (DEBUG lines on stderr)."""
    global _JIEBA_QUIETED
    try:
        import jieba
    except ImportError as exc:
        raise ImportError(
            "the Chinese LongBench metrics need the 'jieba' package; install it with `pip install jieba` "
            "(or `pip install dashkv[eval]`)"
        ) from exc
    if not _JIEBA_QUIETED:
        jieba.setLogLevel(logging.WARNING)
        _JIEBA_QUIETED = True
    return jieba


def _jieba_cut(text: str) -> list[str]:
    """Segment Chinese ``text`` with jieba's accurate mode (``cut_all=False``), as the official code."""
    return list(_jieba().cut(text, cut_all=False))


def _rouge_l_f(prediction: str, ground_truth: str) -> float:
    """Rouge-L F of the ``rouge`` package, 0.0 where it raises (as the official bare ``except``)."""
    try:
        from rouge import Rouge
    except ImportError as exc:
        raise ImportError(
            "rouge_score needs the 'rouge' package (pltrdy's, not 'rouge-score'); install it with "
            "`pip install rouge` (or `pip install dashkv[eval]`)"
        ) from exc
    # Only Rouge-L is computed: Rouge-1/2 (also computed by the official call) fail on exactly the
    # same inputs (an empty hypothesis or reference), so skipping them changes no score.
    scorer = Rouge(metrics=["rouge-l"], stats=["f"])
    try:
        scores = scorer.get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - the official code returns 0 on any failure (empty text, deep recursion)
        return 0.0
    return float(scores["rouge-l"]["f"])


# --------------------------------------------------------------------------------------------------
# Normalisation and token F1
# --------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalise an English answer: lower-case, drop ASCII punctuation, articles and extra spaces.

    Parameters
    ----------
    text : str
        Raw answer.

    Returns
    -------
    str
        The normalised answer, tokens separated by single spaces.
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if ch not in _EN_PUNCTUATION)
    no_articles = re.sub(r"\b(a|an|the)\b", " ", no_punct)
    return " ".join(no_articles.split())


def normalize_zh_answer(text: str) -> str:
    """Normalise a Chinese answer: lower-case, drop ASCII and Chinese punctuation and all whitespace.

    Parameters
    ----------
    text : str
        Raw answer (or one jieba token of it).

    Returns
    -------
    str
        The normalised text, with no whitespace left.
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if ch not in _ALL_PUNCTUATION)
    return "".join(no_punct.split())


def f1_score(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (SQuAD style, counts matter).

    Parameters
    ----------
    prediction_tokens, ground_truth_tokens : sequence of str
        Tokens of the prediction and of one ground truth.

    Returns
    -------
    float
        ``2 P R / (P + R)`` with ``P = common / len(prediction)``, ``R = common / len(ground_truth)``;
        0.0 when no token is shared.
    """
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


# --------------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------------


def qa_f1_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 of English QA after :func:`normalize_answer`, tokens split on whitespace.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        One reference answer.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        F1 in ``[0, 1]``.
    """
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 of Chinese QA: jieba tokens, each normalised by :func:`normalize_zh_answer`, empties dropped.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        One reference answer.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        F1 in ``[0, 1]``.

    Raises
    ------
    ImportError
        If ``jieba`` is not installed.
    """

    def tokens(text: str) -> list[str]:
        normalised = (normalize_zh_answer(tok) for tok in _jieba_cut(text))
        return [tok for tok in normalised if tok]

    return f1_score(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Rouge-L F of the ``rouge`` package (the official summarisation metric).

    The text is split into sentences on ``"."`` and into words on spaces; the union LCS is taken over
    *sets* of words, so repeated words count once. An empty prediction or reference scores 0.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        One reference summary.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        Rouge-L F in ``[0, 1]``.

    Raises
    ------
    ImportError
        If the ``rouge`` package is not installed.
    """
    return _rouge_l_f(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Rouge-L F of Chinese text: both sides are segmented by jieba and joined with spaces first.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        One reference summary or answer.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        Rouge-L F in ``[0, 1]``.

    Raises
    ------
    ImportError
        If ``jieba`` or ``rouge`` is not installed.
    """
    return _rouge_l_f(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
) -> float:
    """Share of the class names found in the prediction that is the right one.

    Every class name that occurs in ``prediction`` (as a substring) is a match; a match that is a
    proper substring of ``ground_truth`` is then removed. The score is ``1 / len(matches)`` when the
    ground truth is among the matches, else 0.

    The official removal loop deletes from the list it is iterating over, so the match right after a
    removed one is skipped (and may stay); this function keeps that behaviour so the numbers match.
    (The official code's similarity fallback is unreachable, behind ``if em_match_list != 0``, and is
    left out.)

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The reference class name.
    all_classes : sequence of str
        All class names of the dataset (the sample's ``all_classes``). Required.

    Returns
    -------
    float
        Score in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``all_classes`` is None.
    """
    if all_classes is None:
        raise ValueError(
            "all_classes=None is not allowed for classification_score; pass the dataset's class names"
        )
    matches = [name for name in all_classes if name in prediction]
    index = 0
    while index < len(matches):  # mirrors ``for term in matches: ... matches.remove(term)``
        term = matches[index]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)  # removes the first equal item, and the index still advances
        index += 1
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _share_of_numbers_equal_to(prediction: str, target: str) -> float:
    """Fraction of the digit runs in ``prediction`` equal to ``target`` (0.0 if there are none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction that equal the ground-truth count (passage_count).

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The reference count, e.g. ``"7"``.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        ``right / found`` over the digit runs of ``prediction``; 0.0 if it has none.
    """
    return _share_of_numbers_equal_to(prediction, str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str, argument_form: str) -> float:
    """Shared body of the two retrieval metrics: the paragraph id is read from ``ground_truth``."""
    ids = re.findall(pattern, ground_truth)
    if not ids:
        raise ValueError(
            f"ground_truth={ground_truth!r} has no paragraph id; expected a text like {argument_form!r}"
        )
    return _share_of_numbers_equal_to(prediction, ids[0])


def retrieval_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction equal to the id in ``"Paragraph N"`` (passage_retrieval_en).

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The reference, e.g. ``"Paragraph 12"``.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        ``right / found`` over the digit runs of ``prediction``; 0.0 if it has none.

    Raises
    ------
    ValueError
        If ``ground_truth`` contains no ``"Paragraph N"``.
    """
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)", "Paragraph 12")


def retrieval_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction equal to the id in ``"段落N"`` (passage_retrieval_zh).

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The reference, e.g. ``"段落12"``.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        ``right / found`` over the digit runs of ``prediction``; 0.0 if it has none.

    Raises
    ------
    ValueError
        If ``ground_truth`` contains no ``"段落N"``.
    """
    return _retrieval(prediction, ground_truth, r"段落(\d+)", "段落12")


def _fuzzywuzzy_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` 0.18.0 without python-Levenshtein, as LongBench's environment ran it."""
    if a == b:  # fuzzywuzzy's check_for_equivalence runs before its empty-string check
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Edit similarity of the first code line of the prediction to the reference line (lcc, repobench-p).

    The scored line is the first line (after leading newlines are stripped) that contains none of
    ``"`"``, ``"#"`` and ``"//"``, or the empty string if there is none. The similarity is fuzzywuzzy's
    integer ``ratio`` divided by 100 (see the module docstring for why ``difflib`` computes it).

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The reference next line of code.
    all_classes : sequence of str, optional
        Unused; accepted so that all metrics share one signature.

    Returns
    -------
    float
        A multiple of 0.01 in ``[0, 1]``.
    """
    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln),
        "",
    )
    return _fuzzywuzzy_ratio(line, ground_truth) / 100


# --------------------------------------------------------------------------------------------------
# Dataset -> metric, and the eval.py rule
# --------------------------------------------------------------------------------------------------

_BASE_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# All 21 LongBench datasets and the 13 LongBench-E ones (``<name>_e``, scored like ``<name>``).
DATASET_TO_METRIC: dict[str, Metric] = {
    **_BASE_METRIC,
    **{f"{name}_e": _BASE_METRIC[name] for name in LONGBENCH_E_DATASETS},
}


def base_dataset(dataset: str) -> str:
    """Map a dataset name to its LongBench name: ``"hotpotqa_e"`` -> ``"hotpotqa"``; others unchanged.

    Parameters
    ----------
    dataset : str
        A key of :data:`DATASET_TO_METRIC`.

    Returns
    -------
    str
        The LongBench (v1) dataset name.

    Raises
    ------
    ValueError
        If ``dataset`` is not a LongBench or LongBench-E dataset.
    """
    if dataset not in DATASET_TO_METRIC:
        raise ValueError(
            f"dataset={dataset!r} is not a LongBench dataset; choose one of {sorted(DATASET_TO_METRIC)}"
        )
    if dataset.endswith("_e") and dataset[:-2] in LONGBENCH_E_DATASETS:
        return dataset[:-2]
    return dataset


def score_prediction(
    dataset: str,
    prediction: str,
    answers: Iterable[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Score one prediction as the official ``eval.py`` does.

    For trec, triviaqa, samsum and lsht (and their ``_e`` variants) only the first line of the
    prediction (after leading newlines are stripped) is scored. The score is the maximum of the
    dataset's metric over all ground truths, and 0.0 if there are none.

    Parameters
    ----------
    dataset : str
        A key of :data:`DATASET_TO_METRIC`, e.g. ``"hotpotqa"`` or ``"hotpotqa_e"``.
    prediction : str
        Model output.
    answers : iterable of str
        The sample's ground truths (its ``answers`` list).
    all_classes : sequence of str, optional
        The sample's ``all_classes``; required for trec and lsht.

    Returns
    -------
    float
        Score in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``dataset`` is unknown, ``answers`` is a single string rather than a list of them, or
        ``all_classes`` is missing for a classification dataset.
    """
    base = base_dataset(dataset)
    if isinstance(answers, str):
        raise ValueError(f"answers={answers!r} must be a list of ground-truth strings, not a single string")
    metric = _BASE_METRIC[base]
    if base in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for ground_truth in answers:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score

