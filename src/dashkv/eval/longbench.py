"""LongBench (v1) protocol: local data files, the official prompts and generation lengths, truncation, scoring.

The data is read from the official jsonl files put in a local folder by the user (the ``data/`` folder
of LongBench's ``data.zip``: ``<dataset>.jsonl`` and, for LongBench-E, ``<dataset>_e.jsonl``); nothing
is downloaded at run time. Prompts and maximum new tokens reproduce the official
``config/dataset2prompt.json`` and ``config/dataset2maxlen.json``; :func:`truncate_middle` and
:func:`truncate_prompt` reproduce the middle truncation of the official ``pred.py``;
:func:`evaluate_predictions` reproduces the official ``eval.py`` (see :mod:`dashkv.eval.metrics`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dashkv.eval.metrics import (
    DATASET_TO_METRIC,
    LONGBENCH_DATASETS,
    LONGBENCH_E_DATASETS,
    base_dataset,
    score_prediction,
)

__all__ = [
    "DATASET2MAXLEN",
    "DATASET2PROMPT",
    "LENGTH_BUCKETS",
    "LONGBENCH_DATASETS",
    "LONGBENCH_E_DATASETS",
    "NO_CHAT_TEMPLATE_DATASETS",
    "STOP_AT_NEWLINE_DATASETS",
    "LongBenchSample",
    "build_prompt",
    "evaluate_predictions",
    "evaluate_predictions_by_length",
    "load_longbench",
    "max_new_tokens",
    "prompt_template",
    "truncate_middle",
    "truncate_prompt",
]

# Prompt template of each dataset, as in the official config/dataset2prompt.json (LongBench v1).
# ``{context}`` and ``{input}`` are filled with ``str.format``. The templates are data and are kept
# character for character, including the official "asconcisely" typo of narrativeqa, the space
# before "Answer" in qasper and the trailing spaces of some instructions: changing them changes scores.
DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you "
        "can, using a single phrase or sentence if possible. If the question cannot be answered based "
        'on the information in the article, write "unanswerable". If the question is a yes/no '
        'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
        "Article: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single "
        "phrase or sentence if possible. If the question cannot be answered based on the information "
        'in the article, write "unanswerable". If the question is a yes/no question, answer "yes", '
        '"no", or "unanswerable". Do not provide any explanation.\n\n'
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n"
        "{context}\n\n"
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n"
        "文章：{context}\n\n"
        "请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n"
        "{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer "
        "the query in one or more sentences.\n\n"
        "Transcript:\n"
        "{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n"
        "{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n"
        "会议记录：\n"
        "{context}\n\n"
        "会议总结："
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n"
        "{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "lsht": (
        "请判断给定新闻的类别，下面是一些例子。\n\n"
        "{context}\n"
        "{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after "
        "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format must be "
        'like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
        "{context}\n\n"
        "下面是一个摘要\n\n"
        "{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n'
        "答案是："
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# Maximum new tokens of each dataset, as in the official config/dataset2maxlen.json.
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# The official pred.py wraps the prompt in the model's chat template except for these (few-shot and
# code completion) datasets, where "chat models are better off without" it.
NO_CHAT_TEMPLATE_DATASETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

# The official pred.py also stops generation at the first newline token (in addition to EOS, and with
# at least one new token) for these datasets, to stop models from writing further dialogue examples.
STOP_AT_NEWLINE_DATASETS: frozenset[str] = frozenset({"samsum"})

# LongBench-E length buckets of the official eval.py: name -> [low, high) in the sample's ``length``.
LENGTH_BUCKETS: dict[str, tuple[float, float]] = {
    "0-4k": (0, 4000),
    "4-8k": (4000, 8000),
    "8k+": (8000, math.inf),
}

_REQUIRED_KEYS = ("input", "context", "answers", "length", "_id")

T = TypeVar("T")


@dataclass(frozen=True)
class LongBenchSample:
    """One LongBench test sample, as stored in the official jsonl files.

    Attributes
    ----------
    input : str
        The question or instruction (empty for the summarisation tasks).
    context : str
        The long context.
    answers : tuple of str
        All ground truths; a prediction scores its best match.
    all_classes : tuple of str or None
        Class names for the classification tasks (trec, lsht); None elsewhere.
    length : int
        Length of the sample as given by LongBench (words for English, characters for Chinese).
    dataset : str
        Dataset name, e.g. ``"hotpotqa"`` or ``"hotpotqa_e"``.
    _id : str
        LongBench's sample id.
    language : str
        ``"en"``, ``"zh"`` or ``"code"`` where the file gives it, else ``""``.
    """

    input: str
    context: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None
    length: int
    dataset: str
    _id: str
    language: str = ""


def _check_dataset(dataset: str) -> str:
    """Return the LongBench (v1) name of ``dataset``; ValueError with the allowed names otherwise."""
    if dataset not in DATASET_TO_METRIC:
        raise ValueError(
            f"dataset={dataset!r} is not a LongBench dataset; choose one of {list(LONGBENCH_DATASETS)} "
            f"or, for LongBench-E, one of {[f'{name}_e' for name in LONGBENCH_E_DATASETS]}"
        )
    return base_dataset(dataset)


def prompt_template(dataset: str) -> str:
    """Official prompt template of ``dataset`` (``_e`` variants use the template of their base dataset).

    Parameters
    ----------
    dataset : str
        A LongBench dataset, e.g. ``"qasper"`` or ``"qasper_e"``.

    Returns
    -------
    str
        The template, with ``{context}`` and (for most datasets) ``{input}`` fields.

    Raises
    ------
    ValueError
        If ``dataset`` is not a LongBench or LongBench-E dataset.
    """
    return DATASET2PROMPT[_check_dataset(dataset)]


def max_new_tokens(dataset: str) -> int:
    """Official maximum number of generated tokens for ``dataset`` (``_e`` variants as their base).

    Parameters
    ----------
    dataset : str
        A LongBench dataset, e.g. ``"qasper"`` or ``"qasper_e"``.

    Returns
    -------
    int
        The ``dataset2maxlen`` value.

    Raises
    ------
    ValueError
        If ``dataset`` is not a LongBench or LongBench-E dataset.
    """
    return DATASET2MAXLEN[_check_dataset(dataset)]


def _as_str_tuple(value: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: field {key!r} must be a list of strings, got {value!r:.80}")
    return tuple(value)


def _parse_sample(record: Any, dataset: str, where: str) -> LongBenchSample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; a LongBench record has {list(_REQUIRED_KEYS)}")
    all_classes = record.get("all_classes")
    length = record["length"]
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"{where}: field 'length' must be an integer, got {length!r}")
    return LongBenchSample(
        input=str(record["input"]),
        context=str(record["context"]),
        answers=_as_str_tuple(record["answers"], "answers", where),
        all_classes=None if all_classes is None else _as_str_tuple(all_classes, "all_classes", where),
        length=length,
        dataset=str(record.get("dataset") or dataset),
        _id=str(record["_id"]),
        language=str(record.get("language") or ""),
    )


def load_longbench(data_dir: str | os.PathLike[str], dataset: str, limit: int | None = None) -> list[LongBenchSample]:
    """Read the samples of one LongBench dataset from the official jsonl file in ``data_dir``.

    Parameters
    ----------
    data_dir : str or path-like
        Folder holding the official files (the ``data/`` folder of LongBench's ``data.zip``).
    dataset : str
        A LongBench dataset (file ``<dataset>.jsonl``) or a LongBench-E one ending in ``_e`` (file
        ``<dataset>_e.jsonl``), e.g. ``"hotpotqa"`` or ``"hotpotqa_e"``.
    limit : int, optional
        Read at most this many samples, from the top of the file. None reads them all.

    Returns
    -------
    list of LongBenchSample
        The samples in file order.

    Raises
    ------
    ValueError
        If ``dataset`` is unknown, ``limit`` is negative, or a line is not a valid LongBench record.
    FileNotFoundError
        If ``<data_dir>/<dataset>.jsonl`` does not exist. Nothing is downloaded.
    """
    _check_dataset(dataset)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} must be None or an integer >= 0")
    path = Path(data_dir) / f"{dataset}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"LongBench file not found: {path} (expected '{dataset}.jsonl' in {Path(data_dir)}; put the "
            "official jsonl files from the data/ folder of LongBench's data.zip there, nothing is downloaded)"
        )
    samples: list[LongBenchSample] = []
    if limit == 0:
        return samples
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            samples.append(_parse_sample(record, dataset, where))
            if limit is not None and len(samples) >= limit:
                break
    return samples


def build_prompt(sample: LongBenchSample) -> str:
    """Fill the official template of the sample's dataset with its context and input.

    The result is the raw prompt, before middle truncation and before any chat template (which the
    official harness applies except for :data:`NO_CHAT_TEMPLATE_DATASETS`).

    Parameters
    ----------
    sample : LongBenchSample
        A sample from :func:`load_longbench`.

    Returns
    -------
    str
        The prompt.

    Raises
    ------
    ValueError
        If ``sample.dataset`` is not a LongBench or LongBench-E dataset.
    """
    return prompt_template(sample.dataset).format(context=sample.context, input=sample.input)


def truncate_middle(token_ids: Sequence[T], max_len: int) -> Sequence[T]:
    """Drop the middle of a token sequence longer than ``max_len``, as the official ``pred.py``.

    A sequence of at most ``max_len`` tokens is returned unchanged. A longer one keeps its first
    ``max_len // 2`` and its last ``max_len // 2`` tokens (so ``max_len - 1`` tokens for an odd
    ``max_len``): the instructions at both ends of a LongBench prompt survive.

    Parameters
    ----------
    token_ids : sequence
        A list or tuple of ids, or a 1-D numpy array or torch tensor.
    max_len : int
        Maximum number of tokens, at least 2.

    Returns
    -------
    sequence
        The same type as ``token_ids`` (the input object itself when it is short enough).

    Raises
    ------
    ValueError
        If ``max_len`` is not an integer >= 2, or ``token_ids`` is an array with more than one dimension.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len={max_len!r} must be an integer >= 2")
    ndim = getattr(token_ids, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got ndim={ndim}")
    length = len(token_ids)
    if length <= max_len:
        return token_ids
    half = max_len // 2
    head, tail = token_ids[:half], token_ids[length - half :]
    if isinstance(token_ids, (list, tuple)):
        return head + tail
    module = type(token_ids).__module__
    if module.startswith("torch"):
        import torch

        return torch.cat([head, tail])  # type: ignore[list-item]
    if module.startswith("numpy"):
        import numpy as np

        return np.concatenate([head, tail])  # type: ignore[return-value]
    return list(head) + list(tail)


class _Tokenizer(Protocol):
    def __call__(self, text: str, *, truncation: bool) -> Any: ...

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str: ...


def truncate_prompt(prompt: str, tokenizer: _Tokenizer, max_len: int) -> str:
    """Middle-truncate a prompt to ``max_len`` tokens the way the official ``pred.py`` does.

    The prompt is tokenized without truncation (with the tokenizer's special tokens); if it is longer
    than ``max_len`` tokens, the first and last ``max_len // 2`` tokens are decoded separately with
    ``skip_special_tokens=True`` and the two strings are joined. A short prompt is returned unchanged.

    Parameters
    ----------
    prompt : str
        The prompt from :func:`build_prompt`.
    tokenizer : callable
        A Hugging Face tokenizer, or any object with the same ``__call__(text, truncation=False)``
        returning ``{"input_ids": [...]}`` and ``decode(ids, skip_special_tokens=True)``.
    max_len : int
        The model's maximum prompt length in tokens, at least 2.

    Returns
    -------
    str
        The (possibly) truncated prompt text.

    Raises
    ------
    ValueError
        If ``max_len`` is not an integer >= 2.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len={max_len!r} must be an integer >= 2")
    token_ids = list(tokenizer(prompt, truncation=False)["input_ids"])
    if len(token_ids) <= max_len:
        return prompt
    half = max_len // 2
    head = tokenizer.decode(token_ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(token_ids[len(token_ids) - half :], skip_special_tokens=True)
    return head + tail


def _scores(dataset: str, predictions: Sequence[str], samples: Sequence[LongBenchSample]) -> list[float]:
    _check_dataset(dataset)
    if isinstance(predictions, str):
        raise ValueError("predictions must be a sequence of strings, one per sample, not a single string")
    if len(predictions) != len(samples):
        raise ValueError(
            f"predictions and samples must have the same length, got {len(predictions)} and {len(samples)}"
        )
    if not samples:
        raise ValueError("predictions and samples are empty; there is nothing to evaluate")
    return [
        score_prediction(dataset, prediction, sample.answers, sample.all_classes)
        for prediction, sample in zip(predictions, samples)
    ]


def evaluate_predictions(
    dataset: str,
    predictions: Sequence[str],
    samples: Sequence[LongBenchSample],
    ndigits: int | None = 2,
) -> float:
    """Mean score of the predictions on one dataset, times 100, as the official ``eval.py``.

    Parameters
    ----------
    dataset : str
        A LongBench dataset, e.g. ``"hotpotqa"`` or ``"hotpotqa_e"``; chooses the metric.
    predictions : sequence of str
        One model output per sample, in the same order.
    samples : sequence of LongBenchSample
        The samples the predictions answer (their ``answers`` and ``all_classes`` are used).
    ndigits : int or None, optional
        Round the result to this many decimals, as the official script (2); None keeps full precision.

    Returns
    -------
    float
        ``100 * mean(score)``, in ``[0, 100]``.

    Raises
    ------
    ValueError
        If ``dataset`` is unknown, or ``predictions`` and ``samples`` differ in length or are empty.
    """
    scores = _scores(dataset, predictions, samples)
    mean = 100 * sum(scores) / len(scores)
    return mean if ndigits is None else round(mean, ndigits)


def evaluate_predictions_by_length(
    dataset: str,
    predictions: Sequence[str],
    samples: Sequence[LongBenchSample],
    ndigits: int | None = 2,
) -> dict[str, float]:
    """Mean score times 100 in each LongBench-E length bucket, as the official ``eval.py --e``.

    Parameters
    ----------
    dataset : str
        A LongBench dataset, usually a LongBench-E one such as ``"hotpotqa_e"``.
    predictions : sequence of str
        One model output per sample, in the same order.
    samples : sequence of LongBenchSample
        The samples the predictions answer; their ``length`` picks the bucket.
    ndigits : int or None, optional
        Round each result to this many decimals (2 as the official script); None keeps full precision.

    Returns
    -------
    dict of str to float
        ``{"0-4k": ..., "4-8k": ..., "8k+": ...}`` (see :data:`LENGTH_BUCKETS`); NaN for an empty bucket.

    Raises
    ------
    ValueError
        If ``dataset`` is unknown, or ``predictions`` and ``samples`` differ in length or are empty.
    """
    scores = _scores(dataset, predictions, samples)
    result: dict[str, float] = {}
    for bucket, (low, high) in LENGTH_BUCKETS.items():
        chosen = [score for score, sample in zip(scores, samples) if low <= sample.length < high]
        if not chosen:
            result[bucket] = math.nan
            continue
        mean = 100 * sum(chosen) / len(chosen)
        result[bucket] = mean if ndigits is None else round(mean, ndigits)
    return result
