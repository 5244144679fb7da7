"""LongBench metrics, loader, prompts, truncation and scoring against hand-computed values.

The fixtures in ``fixtures/`` are small hand-made jsonl files in the official format.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dashkv.eval import longbench as lb
from dashkv.eval import metrics as m

FIXTURES = Path(__file__).parent / "fixtures"

needs_jieba = pytest.mark.skipif(importlib.util.find_spec("jieba") is None, reason="needs jieba (eval extra)")
needs_rouge = pytest.mark.skipif(importlib.util.find_spec("rouge") is None, reason="needs rouge (eval extra)")


# --------------------------------------------------------------------------------------------------
# English QA F1
# --------------------------------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_spaces() -> None:
    assert m.normalize_answer("  The Eiffel-Tower, in   Paris! ") == "eiffeltower in paris"
    # articles are removed as whole words only: "another" keeps its "an"
    assert m.normalize_answer("An apple and another") == "apple and another"


def test_qa_f1_score_hand_computed() -> None:
    # "The Eiffel Tower, in Paris!" -> [eiffel, tower, in, paris] (4 tokens); "Eiffel Tower" -> [eiffel, tower]
    # common = 2 -> P = 2/4, R = 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert m.qa_f1_score("The Eiffel Tower, in Paris!", "Eiffel Tower") == pytest.approx(2 / 3)
    # counts matter: [paris, paris] vs [paris] -> common = min(2, 1) = 1 -> P = 1/2, R = 1 -> F1 = 2/3
    assert m.qa_f1_score("Paris paris", "Paris") == pytest.approx(2 / 3)
    # exact match after normalisation -> 1; no shared token -> 0
    assert m.qa_f1_score("the Blue.", "blue") == 1.0
    assert m.qa_f1_score("green", "blue") == 0.0
    assert m.qa_f1_score("", "blue") == 0.0


# --------------------------------------------------------------------------------------------------
# Chinese QA F1 and Rouge
# --------------------------------------------------------------------------------------------------


@needs_jieba
def test_jieba_segmentation_used_in_the_hand_computations() -> None:
    # the hand computations below rely on these segmentations (jieba 0.42.1, default dictionary)
    assert m._jieba_cut("我们今天去北京大学") == ["我们", "今天", "去", "北京大学"]
    assert m._jieba_cut("北京大学。") == ["北京大学", "。"]
    assert m._jieba_cut("会议讨论了产品设计的问题。") == ["会议", "讨论", "了", "产品设计", "的", "问题", "。"]
    assert m._jieba_cut("会议讨论了问题") == ["会议", "讨论", "了", "问题"]


@needs_jieba
def test_qa_f1_zh_score_hand_computed() -> None:
    # prediction tokens [北京大学, 。] -> "。" normalises to "" and is dropped -> [北京大学]
    # ground truth [我们, 今天, 去, 北京大学]; common = 1 -> P = 1/1, R = 1/4 -> F1 = 2 * 0.25 / 1.25 = 0.4
    assert m.qa_f1_zh_score("北京大学。", "我们今天去北京大学") == pytest.approx(0.4)
    assert m.qa_f1_zh_score("北京大学", "北京大学") == 1.0
    assert m.qa_f1_zh_score("上海", "北京大学") == 0.0


def test_normalize_zh_answer_strips_chinese_and_ascii_punctuation() -> None:
    assert m.normalize_zh_answer("《北京》，Ａ B!") == "《北京ａb"  # "《" is not in the official list, "》" is


@needs_rouge
def test_rouge_score_is_the_rouge_package_set_based_rouge_l() -> None:
    # one sentence each (no "."). Word *sets*: ref {the, cat, lay, on, mat} m = 5, hyp {the, cat, sat, on, mat} n = 5.
    # LCS of the word lists = [the, cat, on, the, mat], as a set {the, cat, on, mat} -> 4.
    # R = P = 4/5 -> F = 2 * (0.64 / (1.6 + 1e-8)) = 0.8 (a plain token Rouge-L, e.g. rouge-score, gives 5/6)
    assert m.rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-7)
    # sentences split on ".": hyp [a b], [c d]; ref [a b c d] -> union LCS {a, b, c, d} = 4 = m = n -> F = 1
    assert m.rouge_score("a b. c d", "a b c d") == pytest.approx(1.0, abs=1e-7)
    # an empty hypothesis makes the rouge package raise: the official code scores it 0
    assert m.rouge_score("", "a summary") == 0.0
    assert m.rouge_score("...", "a summary") == 0.0


@needs_jieba
@needs_rouge
def test_rouge_zh_score_hand_computed() -> None:
    # jieba + spaces: hyp set {会议, 讨论, 了, 产品设计, 的, 问题, 。} n = 7 ("。" is not the "." separator),
    # ref {会议, 讨论, 了, 问题} m = 4, LCS = 4 -> R = 1, P = 4/7 -> F = 2 * (4/7) / (11/7) = 8/11
    assert m.rouge_zh_score("会议讨论了产品设计的问题。", "会议讨论了问题") == pytest.approx(8 / 11, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# Classification, retrieval, count, code
# --------------------------------------------------------------------------------------------------

TREC_CLASSES = ["Abbreviation", "Animal", "Location", "Other location"]


def test_classification_score_hand_computed() -> None:
    # one class name found and it is right -> 1/1
    assert m.classification_score("Type: Animal", "Animal", all_classes=TREC_CLASSES) == 1.0
    # two class names found, one right -> 1/2
    assert m.classification_score("Animal or Abbreviation", "Animal", all_classes=TREC_CLASSES) == 0.5
    # none right -> 0
    assert m.classification_score("Location", "Animal", all_classes=TREC_CLASSES) == 0.0
    # "Other" is a proper substring of the truth "Other location", so it is removed from the matches -> 1/1
    assert m.classification_score("Other location", "Other location", all_classes=["Other", "Other location"]) == 1.0


def test_classification_score_keeps_the_official_skip_after_removal() -> None:
    # matches = [ab, abc, b, abcd]; the official loop removes "ab" (index 0), skips "abc" (now at index 0),
    # removes "b" (index 1), then stops: matches = [abc, abcd] -> 1/2 (without the quirk it would be 1/1)
    assert m.classification_score("abcd", "abcd", all_classes=["ab", "abc", "b", "abcd"]) == 0.5


def test_classification_score_needs_all_classes() -> None:
    with pytest.raises(ValueError, match="all_classes"):
        m.classification_score("Animal", "Animal")


def test_retrieval_and_count_scores_hand_computed() -> None:
    # numbers found: [3, 12]; right: 12 -> 1/2
    assert m.retrieval_score("Paragraph 3, no: Paragraph 12", "Paragraph 12") == 0.5
    assert m.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert m.retrieval_score("I do not know", "Paragraph 12") == 0.0
    # "15" is not "5": numbers [5, 15] -> 1/2
    assert m.retrieval_zh_score("答案是段落5和段落15", "段落5") == 0.5
    assert m.retrieval_zh_score("段落5", "段落5") == 1.0
    # numbers [7, 17] -> 1/2
    assert m.count_score("There are 7 unique paragraphs out of 17", "7") == 0.5
    assert m.count_score("seven", "7") == 0.0


def test_retrieval_score_rejects_a_ground_truth_without_id() -> None:
    with pytest.raises(ValueError, match="ground_truth"):
        m.retrieval_score("Paragraph 1", "the first one")
    with pytest.raises(ValueError, match="ground_truth"):
        m.retrieval_zh_score("段落1", "第一段")


def test_code_sim_score_picks_the_first_plain_line() -> None:
    # "```python", "# add" and "x = 1 // 2" are skipped; the scored line is "return a+b".
    # difflib blocks against "return a + b": "return a" (8), "+" (1), "b" (1) -> M = 10;
    # ratio = 2 * 10 / (10 + 12) = 0.909 -> round(90.9) = 91 -> 0.91
    prediction = "\n```python\n# add\nx = 1 // 2\nreturn a+b\n```"
    assert m.code_sim_score(prediction, "return a + b") == 0.91


def test_code_sim_score_is_fuzzywuzzy_with_difflib() -> None:
    # "i + 1" vs "1 - i": no common substring longer than 1; difflib takes the earliest block first,
    # "i" (a[0] = b[4]), which leaves nothing on either side -> M = 1 -> 2 * 1 / 10 = 20 -> 0.2.
    # (rapidfuzz/Levenshtein compute the true LCS, "  " -> 40: not what the official environment ran.)
    assert m.code_sim_score("i + 1", "1 - i") == 0.2
    # 2 * 3 / 9 = 66.67 -> rounded to the integer 67 -> 0.67
    assert m.code_sim_score("abc", "abcdef") == 0.67
    # fuzzywuzzy: equal strings score 100 before the empty check, an empty one scores 0
    assert m.code_sim_score("# only a comment", "") == 1.0
    assert m.code_sim_score("# only a comment", "return 1") == 0.0


# --------------------------------------------------------------------------------------------------
# score_prediction and the dataset map
# --------------------------------------------------------------------------------------------------


def test_dataset_to_metric_covers_longbench_and_longbench_e() -> None:
    assert len(m.LONGBENCH_DATASETS) == 21
    assert len(m.LONGBENCH_E_DATASETS) == 13
    assert set(m.DATASET_TO_METRIC) == set(m.LONGBENCH_DATASETS) | {f"{d}_e" for d in m.LONGBENCH_E_DATASETS}
    assert m.DATASET_TO_METRIC["hotpotqa"] is m.qa_f1_score
    assert m.DATASET_TO_METRIC["multifieldqa_zh"] is m.qa_f1_zh_score
    assert m.DATASET_TO_METRIC["dureader"] is m.rouge_zh_score
    assert m.DATASET_TO_METRIC["samsum"] is m.rouge_score
    assert m.DATASET_TO_METRIC["lsht"] is m.classification_score
    assert m.DATASET_TO_METRIC["passage_count"] is m.count_score
    assert m.DATASET_TO_METRIC["passage_retrieval_zh"] is m.retrieval_zh_score
    assert m.DATASET_TO_METRIC["repobench-p_e"] is m.code_sim_score
    assert "lsht_e" not in m.DATASET_TO_METRIC


def test_score_prediction_scores_only_the_first_line_of_few_shot_tasks() -> None:
    # trec: first line "Animal" -> 1/1; the whole text would also match "Abbreviation" -> 1/2
    prediction = "\nAnimal\nQuestion: What is NASA?\nType: Abbreviation"
    assert m.score_prediction("trec", prediction, ["Animal"], TREC_CLASSES) == 1.0
    assert m.score_prediction("trec_e", prediction, ["Animal"], TREC_CLASSES) == 1.0
    assert m.classification_score(prediction, "Animal", all_classes=TREC_CLASSES) == 0.5
    # triviaqa: first line "Paris" -> F1 1; hotpotqa scores all of it:
    # [paris, question, capital, of, italy, answer, rome] (7) vs [paris] -> P = 1/7, R = 1 -> F1 = 2/8 = 0.25
    text = "Paris\nQuestion: capital of Italy?\nAnswer: Rome"
    assert m.score_prediction("triviaqa", text, ["Paris"]) == 1.0
    assert m.score_prediction("hotpotqa", text, ["Paris"]) == pytest.approx(0.25)


def test_score_prediction_takes_the_best_ground_truth() -> None:
    # vs "Eiffel Tower": P = 1, R = 1/2 -> 2/3; vs "the tower" -> [tower] -> 1
    assert m.score_prediction("hotpotqa", "tower", ["Eiffel Tower", "the tower"]) == 1.0
    assert m.score_prediction("hotpotqa", "tower", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert m.score_prediction("hotpotqa", "tower", []) == 0.0


def test_score_prediction_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dataset='nq'.*hotpotqa"):
        m.score_prediction("nq", "x", ["x"])
    with pytest.raises(ValueError, match="answers"):
        m.score_prediction("hotpotqa", "x", "x")
    with pytest.raises(ValueError, match="all_classes"):
        m.score_prediction("trec", "Animal", ["Animal"])


def test_missing_optional_dependency_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` raise ImportError
    with pytest.raises(ImportError, match="pip install jieba"):
        m.qa_f1_zh_score("北京", "北京")
    monkeypatch.setitem(sys.modules, "rouge", None)
    with pytest.raises(ImportError, match="pip install rouge"):
        m.rouge_score("a", "a")


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------


def test_load_longbench_reads_the_official_fields() -> None:
    samples = lb.load_longbench(FIXTURES, "hotpotqa")
    assert [s._id for s in samples] == ["hp-0", "hp-1", "hp-2"]  # the blank line is skipped
    first = samples[0]
    assert first.input == "Which tower is in Paris?"
    assert first.context == "Passage 1:\nThe Eiffel Tower is in Paris."
    assert first.answers == ("Eiffel Tower",)
    assert first.all_classes is None
    assert first.length == 9
    assert first.dataset == "hotpotqa"
    assert first.language == "en"
    assert samples[1].answers == ("William Shakespeare", "Shakespeare")
    trec = lb.load_longbench(str(FIXTURES), "trec")
    assert trec[0].all_classes == tuple(TREC_CLASSES)


def test_load_longbench_limit_and_longbench_e() -> None:
    assert [s._id for s in lb.load_longbench(FIXTURES, "hotpotqa", limit=2)] == ["hp-0", "hp-1"]
    assert lb.load_longbench(FIXTURES, "hotpotqa", limit=0) == []
    lcc = lb.load_longbench(FIXTURES, "lcc_e")
    assert [s.length for s in lcc] == [1500, 5000, 9000]
    with pytest.raises(ValueError, match="limit=-1"):
        lb.load_longbench(FIXTURES, "hotpotqa", limit=-1)


def test_load_longbench_missing_file_names_path_and_expected_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        lb.load_longbench(tmp_path, "qasper")
    assert str(tmp_path / "qasper.jsonl") in str(info.value)
    assert "'qasper.jsonl'" in str(info.value)
    with pytest.raises(FileNotFoundError, match="'qasper_e.jsonl'"):
        lb.load_longbench(tmp_path, "qasper_e")


def test_load_longbench_rejects_unknown_dataset_and_bad_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset='lsht_e'.*hotpotqa_e"):
        lb.load_longbench(FIXTURES, "lsht_e")  # lsht has no LongBench-E version
    (tmp_path / "musique.jsonl").write_text('{"input": "q"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"musique.jsonl:1: not valid JSON"):
        lb.load_longbench(tmp_path, "musique")
    (tmp_path / "musique.jsonl").write_text('{"input": "q", "context": "c", "length": 3, "_id": "x"}\n')
    with pytest.raises(ValueError, match=r"musique.jsonl:1: missing field\(s\) \['answers'\]"):
        lb.load_longbench(tmp_path, "musique")
    (tmp_path / "musique.jsonl").write_text('{"input": "q", "context": "c", "answers": "a", "length": 3, "_id": "x"}')
    with pytest.raises(ValueError, match="'answers' must be a list of strings"):
        lb.load_longbench(tmp_path, "musique")


# --------------------------------------------------------------------------------------------------
# Prompts and generation lengths
# --------------------------------------------------------------------------------------------------


def test_prompt_tables_cover_the_21_datasets() -> None:
    assert tuple(lb.DATASET2PROMPT) == m.LONGBENCH_DATASETS
    assert set(lb.DATASET2MAXLEN) == set(m.LONGBENCH_DATASETS)
    assert lb.max_new_tokens("hotpotqa") == 32
    assert lb.max_new_tokens("gov_report_e") == 512
    assert lb.max_new_tokens("samsum") == 128
    assert lb.prompt_template("qasper_e") == lb.DATASET2PROMPT["qasper"]
    with pytest.raises(ValueError, match="dataset='nq'"):
        lb.max_new_tokens("nq")


def test_build_prompt_fills_the_official_template() -> None:
    sample = lb.load_longbench(FIXTURES, "hotpotqa")[0]
    assert lb.build_prompt(sample) == (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\nPassage 1:\nThe Eiffel Tower is in Paris.\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nQuestion: Which tower is in Paris?\nAnswer:"
    )
    trec = lb.load_longbench(FIXTURES, "trec")[0]
    assert lb.build_prompt(trec) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "Question: What does NASA stand for?\nType: Abbreviation\nQuestion: What is a dog?\nType: Animal\n"
        "What is a cat?"
    )
    zh = lb.load_longbench(FIXTURES, "passage_retrieval_zh")[0]
    assert lb.build_prompt(zh).endswith('一座城市的简介。\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：')


def test_build_prompt_keeps_braces_of_the_context_and_handles_e_variants() -> None:
    sample = lb.load_longbench(FIXTURES, "lcc_e")[2]
    assert sample.dataset == "lcc_e"
    assert lb.build_prompt(sample) == (
        "Please complete the code given below. \ndef double(x):\n    y = {x: 2}\nNext line of code:\n"
    )


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def test_truncate_middle_keeps_first_and_last_halves() -> None:
    ids = list(range(10))
    assert lb.truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(ids, 5) == [0, 1, 8, 9]  # int(5 / 2) = 2 on each side, as pred.py
    assert lb.truncate_middle(ids, 10) is ids  # short enough: unchanged
    assert lb.truncate_middle(tuple(ids), 6) == (0, 1, 2, 7, 8, 9)
    np.testing.assert_array_equal(lb.truncate_middle(np.arange(10), 4), [0, 1, 8, 9])


def test_truncate_middle_on_torch_tensors() -> None:
    torch = pytest.importorskip("torch")  # imported here: the rest of the file stays fast without it
    assert lb.truncate_middle(torch.arange(10), 4).tolist() == [0, 1, 8, 9]


def test_truncate_middle_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="max_len=1"):
        lb.truncate_middle([1, 2, 3], 1)
    with pytest.raises(ValueError, match="one-dimensional"):
        lb.truncate_middle(np.zeros((2, 5)), 4)


class _CharTokenizer:
    """One token per character, with a BOS special token (id 0) in front, like a Llama tokenizer."""

    def __call__(self, text: str, *, truncation: bool) -> dict[str, list[int]]:
        assert truncation is False
        return {"input_ids": [0] + [ord(ch) for ch in text]}

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool) -> str:
        return "".join(chr(t) for t in token_ids if not (skip_special_tokens and t == 0))


def test_truncate_prompt_decodes_both_halves_like_pred_py() -> None:
    # ids [BOS, a, ..., j] (11 > 6): head [BOS, a, b] -> "ab" (BOS skipped), tail [h, i, j] -> "hij"
    assert lb.truncate_prompt("abcdefghij", _CharTokenizer(), 6) == "abhij"
    assert lb.truncate_prompt("abc", _CharTokenizer(), 6) == "abc"


# --------------------------------------------------------------------------------------------------
# evaluate_predictions
# --------------------------------------------------------------------------------------------------


def test_evaluate_predictions_mean_times_100() -> None:
    samples = lb.load_longbench(FIXTURES, "hotpotqa")
    # hp-0: 2/3 (see test_qa_f1_score_hand_computed); hp-1: best of 2/3 and 1 -> 1; hp-2: 0
    # mean = (2/3 + 1 + 0) / 3 = 5/9 -> 55.555... -> 55.56
    predictions = ["The Eiffel Tower, in Paris!", "Shakespeare", "green"]
    assert lb.evaluate_predictions("hotpotqa", predictions, samples) == 55.56
    assert lb.evaluate_predictions("hotpotqa", predictions, samples, ndigits=None) == pytest.approx(500 / 9)
    trec = lb.load_longbench(FIXTURES, "trec")
    # trec-0: first line "Animal" -> 1; trec-1: "Location" is found, "Other location" is not -> 0 -> 50.0
    assert lb.evaluate_predictions("trec", ["Animal\nType: Location", "Location"], trec) == 50.0
    zh = lb.load_longbench(FIXTURES, "passage_retrieval_zh")
    # numbers [1] -> 1; numbers [1, 2] with truth 2 -> 1/2 -> mean 0.75 -> 75.0
    assert lb.evaluate_predictions("passage_retrieval_zh", ["段落1", "段落1或段落2"], zh) == 75.0


def test_evaluate_predictions_by_length_buckets() -> None:
    samples = lb.load_longbench(FIXTURES, "lcc_e")
    # length 1500 -> "0-4k": exact line -> 1.0
    # length 5000 -> "4-8k": scored line "return i+1" vs "return i + 1": blocks "return i" (8), "+", "1"
    #   -> M = 10 -> 2 * 10 / 22 = 90.9 -> 91 -> 0.91
    # length 9000 -> "8k+": no plain line -> "" -> 0
    predictions = ["return a + b", "```\nreturn i+1\n```", "# nothing"]
    assert lb.evaluate_predictions_by_length("lcc_e", predictions, samples) == {"0-4k": 100.0, "4-8k": 91.0, "8k+": 0.0}
    assert lb.evaluate_predictions("lcc_e", predictions, samples) == 63.67  # (100 + 91 + 0) / 3
    only_short = lb.evaluate_predictions_by_length("lcc_e", predictions[:1], samples[:1])
    assert only_short["0-4k"] == 100.0 and np.isnan(only_short["8k+"])


def test_evaluate_predictions_rejects_bad_input() -> None:
    samples = lb.load_longbench(FIXTURES, "hotpotqa")
    with pytest.raises(ValueError, match="same length, got 1 and 3"):
        lb.evaluate_predictions("hotpotqa", ["x"], samples)
    with pytest.raises(ValueError, match="empty"):
        lb.evaluate_predictions("hotpotqa", [], [])
    with pytest.raises(ValueError, match="dataset='HotpotQA'"):
        lb.evaluate_predictions("HotpotQA", ["x"] * 3, samples)
