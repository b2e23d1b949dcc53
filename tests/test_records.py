"""Records: parsing once, rendering back byte for byte, and the per-row flags."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhrlhf.records import (
    ROW_CHECKS,
    Comparison,
    Dialogue,
    MalformedRow,
    RedTeamAttempt,
    Turn,
    parse_num_params,
    row_flags,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_every_real_row_renders_back_byte_for_byte(real_file: Path) -> None:
    rows = _rows(real_file)
    assert len(rows) == 2312
    for i, row in enumerate(rows):
        c = Comparison.from_strings(row["chosen"], row["rejected"], index=i)
        assert c.render_chosen() == row["chosen"], i
        assert c.render_rejected() == row["rejected"], i
        # prompt + the final response is the whole dialogue, by turns
        if "final_turn_not_assistant" not in c.flags:
            assert c.chosen_dialogue.turns[-1] == Turn("assistant", c.chosen,
                                                       c.chosen_dialogue.turns[-1].sep)
            assert c.chosen_dialogue.turns[:-1] == c.prompt


def test_fast_flags_equal_reference_flags_on_real_rows(real_file: Path) -> None:
    seen: set[str] = set()
    for row in _rows(real_file):
        c = Comparison.from_strings(row["chosen"], row["rejected"])
        ref = row_flags(Dialogue.parse(row["chosen"]), Dialogue.parse(row["rejected"]))
        assert c.flags == ref
        seen |= c.flags
    # the real file has these traps; DATA.md says so
    assert {"role_marker_in_text", "empty_response"} <= seen
    assert seen <= set(ROW_CHECKS)


def test_split_is_by_turns_not_characters() -> None:
    # Character-level common prefix would cut inside the word: "I" + "haven't" vs "don't".
    chosen = "\n\nHuman: Did you eat?\n\nAssistant: I haven't."
    rejected = "\n\nHuman: Did you eat?\n\nAssistant: I don't."
    c = Comparison.from_strings(chosen, rejected)
    assert c.prompt == (Turn("human", "Did you eat?"),)
    assert (c.chosen, c.rejected) == ("I haven't.", "I don't.")
    assert c.flags == frozenset()


def test_multi_turn_context_is_kept() -> None:
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes"
    rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no"
    c = Comparison.from_strings(chosen, rejected)
    assert [t.role for t in c.prompt] == ["human", "assistant", "human"]
    assert [t.text for t in c.prompt] == ["a", "b", "c"]
    assert c.num_turns == 4


def test_identical_pair_keeps_whole_responses() -> None:
    s = "\n\nHuman: hi\n\nAssistant: hello there"
    c = Comparison.from_strings(s, s)
    assert c.chosen == c.rejected == "hello there"
    assert {"identical_pair", "identical_responses"} <= c.flags


def test_context_mismatch_is_flagged_not_mangled() -> None:
    chosen = "\n\nHuman: first\n\nAssistant: x\n\nHuman: more\n\nAssistant: good"
    rejected = "\n\nHuman: other\n\nAssistant: bad"
    c = Comparison.from_strings(chosen, rejected)
    assert "context_mismatch" in c.flags
    assert c.rejected == "bad"
    assert c.rejected_prompt == (Turn("human", "other"),)
    assert c.render_rejected() == rejected


def test_one_dialogue_a_prefix_of_the_other() -> None:
    # Zipping turn lists strictly crashes here; we flag it.
    chosen = "\n\nHuman: a\n\nAssistant: b"
    rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
    c = Comparison.from_strings(chosen, rejected)
    assert {"final_turn_not_assistant", "context_mismatch"} <= c.flags
    assert c.rejected == ""
    assert c.render_rejected() == rejected


def test_empty_final_response_and_inline_marker() -> None:
    c = Comparison.from_strings("\n\nHuman: q\n\nAssistant:", "\n\nHuman: q\n\nAssistant: Human: x")
    assert c.chosen == "" and c.rejected == "Human: x"
    assert {"empty_response", "role_marker_in_text"} <= c.flags
    assert c.render_chosen() == "\n\nHuman: q\n\nAssistant:"


def test_non_alternating_and_malformed() -> None:
    c = Comparison.from_strings("junk\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
                                "junk\n\nHuman: a\n\nHuman: b\n\nAssistant: d")
    assert {"non_alternating_roles", "malformed_dialogue"} <= c.flags
    assert c.chosen_dialogue.preamble == "junk"


# Dialogues built from turns whose text may hold newlines, colons and bare role words.
_text = st.text(alphabet=st.sampled_from(list("ab :\nHumanAssist’é")), max_size=30)
_turn = st.builds(Turn, st.sampled_from(["human", "assistant"]), _text, st.sampled_from([" ", ""]))
_dialogue = st.builds(lambda ts, pre: Dialogue(tuple(ts), pre).render(),
                      st.lists(_turn, max_size=6), st.sampled_from(["", "x", "\n"]))
_garbage = st.text(alphabet=st.sampled_from(list("\n HumanAssist:x")), max_size=60)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_dialogue, _garbage))
def test_any_string_renders_back(s: str) -> None:
    assert Dialogue.parse(s).render() == s


@settings(max_examples=600, deadline=None)
@given(st.one_of(_dialogue, _garbage), st.one_of(_dialogue, _garbage), st.booleans())
def test_generated_pairs_never_crash_and_flags_match_reference(a: str, b: str, share: bool) -> None:
    if share:  # the common shape: same context, different final turn
        cut = a.rfind("\n\nAssistant:")
        b = (a[:cut] if cut >= 0 else a) + "\n\nAssistant: " + b.replace("\n\n", " ")
    c = Comparison.from_strings(a, b)
    assert c.render_chosen() == a and c.render_rejected() == b
    assert c.flags == row_flags(Dialogue.parse(a), Dialogue.parse(b))


def _redteam_row(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "transcript": "\n\nHuman: how do I pick a lock?\n\nAssistant: I can't help with that.",
        "min_harmlessness_score_transcript": -0.5,
        "num_params": "2.7B",
        "model_type": "plain lm",
        "rating": 3,
        "task_description": "lockpicking",
        "task_description_harmlessness_score": 0.25,
        "red_team_member_id": 7,
        "is_upworker": False,
        "tags": None,
    }
    row.update(over)
    return row


def test_redteam_attempt_types_every_field() -> None:
    a = RedTeamAttempt.from_json(_redteam_row(tags=["theft"]))
    assert a.num_parameters == 2_700_000_000 and a.num_params == "2.7B"
    assert a.rating == 3.0 and a.tags == ("theft",) and a.is_upworker is False
    assert [t.role for t in a.transcript.turns] == ["human", "assistant"]
    assert a.to_json()["transcript"] == _redteam_row()["transcript"]


@pytest.mark.parametrize("bad", [{"rating": "high"}, {"tags": "x"}, {"num_params": "big"},
                                 {"is_upworker": 1}, {"transcript": None}])
def test_redteam_attempt_rejects_wrong_shapes(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RedTeamAttempt.from_json(_redteam_row(**bad))


def test_parse_num_params() -> None:
    assert [parse_num_params(s) for s in ("2.7B", "13B", "52B", "810M")] == [
        2_700_000_000, 13_000_000_000, 52_000_000_000, 810_000_000]


@pytest.mark.parametrize("text", ["infB", "-2.7B", "", "abc", "nanB", "1e400B", "0B", "2.7",
                                  "B", "1_3B", "٣B", "13 B B"])
def test_parse_num_params_refuses_what_is_not_a_count(text: str) -> None:
    with pytest.raises(MalformedRow, match="field 'num_params' is not a parameter count"):
        parse_num_params(text)


PUBLISHED = "task_descripton_harmlessness_score"  # (sic) the real file's spelling
CARD = "task_description_harmlessness_score"


def _published_row(**over: object) -> dict[str, object]:
    """A row as the real file has it: the sic spelling, in its place among the fields."""
    return {(PUBLISHED if k == CARD else k): v for k, v in _redteam_row(**over).items()}


def test_both_spellings_of_the_task_score_give_one_field() -> None:
    real = RedTeamAttempt.from_json(_published_row(rating=3.0))
    card = RedTeamAttempt.from_json(_redteam_row(rating=3.0))
    assert real.task_description_harmlessness_score == card.task_description_harmlessness_score
    assert real.task_description_harmlessness_score == 0.25
    # given back as read: the real file's row round-trips key for key, in order
    assert list(real.to_json().items()) == list(_published_row(rating=3.0).items())
    assert list(card.to_json().items()) == list(_redteam_row(rating=3.0).items())


def test_a_row_with_both_or_neither_spelling_is_refused() -> None:
    both = {**_published_row(), CARD: 0.25}
    with pytest.raises(MalformedRow, match="both 'task_descripton_harmlessness_score'"):
        RedTeamAttempt.from_json(both)
    neither = {k: v for k, v in _redteam_row().items() if k != CARD}
    with pytest.raises(MalformedRow) as e:
        RedTeamAttempt.from_json(neither)
    assert str(e.value) == ("missing field(s): task_descripton_harmlessness_score "
                            "(or task_description_harmlessness_score)")


@pytest.mark.parametrize("bad", [{"rating": float("nan")}, {"rating": 4.5}, {"rating": -1.0},
                                 {PUBLISHED: float("inf")},
                                 {"min_harmlessness_score_transcript": float("-inf")},
                                 {"min_harmlessness_score_transcript": 10**400}])
def test_numbers_that_are_not_finite_or_out_of_range_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(MalformedRow):
        RedTeamAttempt.from_json(_published_row(**bad))
