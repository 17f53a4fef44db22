"""Generated answers as data: left padding, the TensorBoard table,
the test rows and the text metrics (checked against rouge-score's own numbers on a known pair)."""
import pytest

from trainer.generation import before_after, markdown_table, stop_ids, text_metrics
from trainer.tasks.causal_lm import left_pad
from trainer.zero3_generation import HEADROOM, choose, gather_fits


def test_left_padding_puts_every_prompt_against_the_right_edge():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids == [[5, 6, 7], [0, 0, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


def test_markdown_table_keeps_one_row_per_answer_whatever_the_text_holds():
    rows = [{"id": 3, "prompt": "a | b", "reference": "line 1\nline 2", "answer": "ok"},
            {"id": 9, "prompt": "p", "reference": "r", "answer": ""}]
    table = markdown_table(rows).splitlines()
    assert table[:2] == ["| id | prompt | reference | answer |", "|---|---|---|---|"]
    assert table[2] == r"| 3 | a \| b | line 1<br>line 2 | ok |"
    assert table[3] == "| 9 | p | r |  |" and len(table) == 4


def test_text_metrics_are_exact_match_and_rouge_score_rouge_l():
    from rouge_score import rouge_scorer

    pair = ("Answer: 6. The word has 6 letters.", "Answer: 6. The word bridge has 6 letters.")
    rows = [{"reference": pair[0], "answer": pair[1]}, {"reference": " Answer: PENCIL. ", "answer": "Answer: PENCIL."}]
    metrics = text_metrics(rows)
    assert metrics["exact_match"] == 0.5  # stripped strings compared
    # LCS 7 of 7 reference and 8 answer tokens: F1 = 2 * (7/8) * 1 / (7/8 + 1) = 14/15
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(*pair)["rougeL"].fmeasure
    assert expected == pytest.approx(14 / 15)
    assert metrics["rougeL_f1"] == pytest.approx((14 / 15 + 1) / 2)


def test_before_after_joins_the_two_passes_by_id():
    before = [{"id": 1, "prompt": "p1", "reference": "r1", "answer": "b1"},
              {"id": 4, "prompt": "p4", "reference": "r4", "answer": "b4"}]
    after = [{**before[1], "answer": "a4"}, {**before[0], "answer": "a1"}]
    assert before_after(before, after) == [
        {"id": 1, "prompt": "p1", "reference": "r1", "before": "b1", "after": "a1"},
        {"id": 4, "prompt": "p4", "reference": "r4", "before": "b4", "after": "a4"}]


def test_stop_ids_join_the_tokenizers_eos_and_the_generation_configs_list_once_each():
    assert stop_ids(2, [128001, 128009]) == [2, 128001, 128009]
    assert stop_ids(128009, [128001, 128009]) == [128009, 128001]
    assert stop_ids(None, 7) == [7] and stop_ids(None, None) == []


def test_zero3_generation_gathers_where_the_whole_model_fits_every_worker_else_steps_synced():
    gib = 2**30
    assert gather_fits(4 * gib, int(4 * gib * HEADROOM)) and not gather_fits(4 * gib, int(4 * gib * HEADROOM) - 1)
    fits, tight = choose("auto", 3, 2, gib, 8 * gib), choose("auto", 3, 2, 8 * gib, 8 * gib)
    assert (fits.gathered, fits.synced) == (True, False) and (tight.gathered, tight.synced) == (False, True)
    assert "synced, every new token all-gathers" in tight.describe() and "8.00 GiB of weights" in tight.describe()
    assert choose("gathered", 3, 2, 8 * gib, 0).gathered and not choose("synced", 3, 2, 0, 8 * gib).gathered
    assert not choose("synced", 3, 1, 0, 0).synced  # one rank has nobody to wait for
    for stage in (0, 1, 2):  # the whole model is on every rank already
        assert choose("auto", stage, 2, 8 * gib, 0) == choose("gathered", stage, 2, 0, 0)
        assert not choose("auto", stage, 2, 8 * gib, 0).synced


def test_the_startup_summary_says_how_zero3_will_generate():
    from launcher.plan import generation_lines
    from tests.unit.test_config import build

    assert not any("ZeRO-3" in line for line in generation_lines(build(), 10**9))
    auto = generation_lines(build(deepspeed={"zero_stage": 3}), 2**28)[-1]
    assert auto.startswith("generation under ZeRO-3 (eval.generate.zero3: auto): the whole model (1.00 GiB in fp32 on "
                           "CPU workers, half that in bf16 on GPUs) gathered")
    assert "else synced" in auto
    synced = generation_lines(build(deepspeed={"zero_stage": 3, "precision": "bf16"},
                                    eval={"generate": {"zero3": "synced"}}), 2**28)[-1]
    assert "synced: every new token all-gathers every weight" in synced
