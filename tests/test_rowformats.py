"""Rows in the shapes TRL and OpenAI use (and `hhrlhf export` writes) are read by every command
that reads preference rows or prompts, as the same records as the official rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from hhrlhf.cli import main
from hhrlhf.errors import HHRLHFError
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison, Dialogue
from hhrlhf.rl.prompts import dialogue_prompts, load_prompts
from hhrlhf.rowformats import comparison_of_row, dialogue_of_row, to_messages

N = 60  # rows of the real file used here


@pytest.fixture(scope="module")
def rows(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Comparison]]:
    folder = tmp_path_factory.mktemp("shapes")
    head = folder / "head.jsonl"
    with gzip.open(real_file, "rt", encoding="utf-8") as fh:
        head.write_text("".join(next(fh) for _ in range(N)))
    return head, list(read_comparisons(head))


def _export(head: Path, fmt: str, out: Path) -> list[dict[str, object]]:
    main(["export", str(head), "--format", fmt, "-o", str(out)])
    return [json.loads(x) for x in out.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["trl", "trl-text"])
def test_a_trl_export_reads_back_as_the_published_rows(
        rows: tuple[Path, list[Comparison]], tmp_path: Path, fmt: str) -> None:
    head, records = rows
    out = tmp_path / f"{fmt}.jsonl"
    exported = _export(head, fmt, out)
    assert exported and "prompt" in exported[0]
    back = list(read_comparisons(out))
    assert len(back) == len(exported)
    by_pair = {(c.chosen_raw, c.rejected_raw) for c in records}
    # every row the format held comes back as the very strings of the published row
    assert all((c.chosen_raw, c.rejected_raw) in by_pair for c in back)
    assert [c.prompt for c in back][:5] == [c.prompt for c in records][:5]


def test_audit_reads_a_trl_text_export(rows: tuple[Path, list[Comparison]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf-trltext.jsonl"
    exported = _export(rows[0], "trl-text", out)
    capsys.readouterr()
    main(["audit", str(out)])
    assert f"audit: {len(exported)} rows" in capsys.readouterr().out


def test_prompts_of_every_shape_are_the_same_dialogues(rows: tuple[Path, list[Comparison]],
                                                       tmp_path: Path) -> None:
    head, records = rows
    want = [Dialogue(c.prompt) for c in records[:10]]
    shapes = {
        "trl.jsonl": [{"prompt": to_messages(d.turns)} for d in want],
        "prompt-text.jsonl": [{"prompt": d.render() + "\n\nAssistant:"} for d in want],
        "openai.jsonl": [{"messages": to_messages(c.chosen_dialogue.turns)}
                         for c in records[:10]],
    }
    for name, objs in shapes.items():
        path = tmp_path / name
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
        got = load_prompts([str(path)])
        assert [g.turns for g in got] == [d.turns for d in want][: len(got)], name
        assert len(got) == len({d.render() for d in want}), name
        ids = [i for i, _ in dialogue_prompts([str(path)], unique=False)]
        assert ids == [f"{path}:{k}" for k in range(10)], name
    # the official rows give the same prompts
    assert [g.turns for g in load_prompts([str(head)], limit=3)] == [d.turns for d in want[:3]]


def test_a_plain_text_prompt_is_the_human_turn() -> None:
    d = dialogue_of_row({"prompt": "How do I bake bread?"})
    assert [(t.role, t.text) for t in d.turns] == [("human", "How do I bake bread?")]


def test_conversational_rows_with_an_implicit_prompt() -> None:
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rejected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]
    c = comparison_of_row({"chosen": chosen, "rejected": rejected})
    assert c.chosen_raw == "\n\nHuman: hi\n\nAssistant: hello"
    assert (c.chosen, c.rejected) == ("hello", "go away") and not c.flags


@pytest.mark.parametrize("obj, message", [
    ({"messages": [{"role": "system", "content": "be nice"}]}, "'system' message has no place"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, "role and content"),
    ({"prompt": "x", "chosen": [], "rejected": []}, "both as text or both as messages"),
    ({"chosen": 3, "rejected": "x"}, "key 'chosen' is a number"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_line(obj: dict[str, object],
                                                           message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Human: fine"}\n' + json.dumps(obj) + "\n")
    with pytest.raises(HHRLHFError) as e:
        load_prompts([str(path)])
    assert message in str(e.value) and f"{path}:2:" in str(e.value)
