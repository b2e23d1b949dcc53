"""`hhrlhf collect` storage and export: real SQLite files, hhrlhf's own readers and commands on
the exported files, idempotent writes, and a writer process killed with SIGKILL."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from collect_support import annotator, converse, key, red_team

from hhrlhf.collect import work
from hhrlhf.collect.export import FILES, MANIFEST, export, side_name
from hhrlhf.collect.store import Conflict, Store, open_store
from hhrlhf.errors import HHRLHFError
from hhrlhf.read import read_comparisons, read_redteam
from hhrlhf.records import TASK_SCORE, TASK_SCORE_AS_PUBLISHED

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from hhrlhf.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = open_store(tmp_path / "collect.sqlite")
    yield s
    s.close()


def test_sqlite_is_wal_with_full_sync(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
        assert tx.one("PRAGMA synchronous")[0] == 2  # type: ignore[index]  # FULL


def test_tokens_are_stored_hashed(store: Store, tmp_path: Path) -> None:
    aid, token = store.add_annotator("Ada", "annotator")
    assert aid == 1
    assert store.annotator_by_token(token).name == "Ada"  # type: ignore[union-attr]
    assert store.annotator_by_token(token + "x") is None
    store.close()
    assert token.encode() not in (tmp_path / "collect.sqlite").read_bytes()


def test_helpful_export_reads_back_as_official_rows(store: Store, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ada = annotator(store, "Ada")
    converse(store, ada, "helpful", ["How do I boil an egg?", "And a soft one?",
                                     "Thanks, what about poaching?"],
             picks=["left", "right", "left"])
    result = export(store, tmp_path / "out")
    assert result.rows == {"helpful": 3}
    path = tmp_path / "out" / FILES["helpful"]
    rows = list(read_comparisons([path]))
    assert len(rows) == 3
    for turn, c in enumerate(rows):
        assert not c.flags, c.flags
        # chosen and rejected share the dialogue so far and differ in the final turn only
        assert c.prompt == c.rejected_prompt
        assert len(c.prompt) == 2 * turn + 1
        assert {c.chosen, c.rejected} == {f"Answer A{turn} to {c.prompt[-1].text}",
                                          f"Answer B{turn} to {c.prompt[-1].text}"}
    # the conversation went on from the picked (chosen) response
    assert rows[1].prompt[1].text == rows[0].chosen
    assert rows[2].prompt[3].text == rows[1].chosen
    side = [json.loads(line) for line in (tmp_path / "out" / side_name(FILES["helpful"]))
            .read_text().splitlines()]
    assert [s["index"] for s in side] == [0, 1, 2]
    assert all(s["picked"] == "chosen" and s["strength"] == "much better" for s in side)
    assert all(s["annotator_id"] == ada.id for s in side)
    assert {s["policy_chosen"] for s in side} <= {"pol-a", "pol-b"}
    # each response's own settings: pol-a's were {"seed": turn}, pol-b's {"seed": -turn}
    assert all(s["settings_chosen"]["seed"] == (s["turn"] // 2 if s["policy_chosen"] == "pol-a"
                                                else -(s["turn"] // 2)) for s in side)
    # the official row holds nothing but the two strings
    with gzip.open(path, "rt") as fh:
        assert all(set(json.loads(line)) == {"chosen", "rejected"} for line in fh)
    code, _, err = run_cli(["audit", str(path), "--fail-on", "all"], capsys)
    assert code == 0, err
    code, _out, err = run_cli(["stats", str(path)], capsys)
    assert code == 0, err
    # and a preference model trains on them (the lexical one: seconds)
    code, _out, err = run_cli(["pm", "lexical", str(path), "--out", str(tmp_path / "pm")],
                              capsys)
    assert code == 0, err
    from hhrlhf.pm import load

    assert load(tmp_path / "pm").score_pairs(rows)[0].shape == (3,)


def test_harmless_pick_is_rejected(store: Store, tmp_path: Path) -> None:
    ada = annotator(store, "Ada")
    converse(store, ada, "harmless", ["Tell me something mean."], picks=["right"])
    export(store, tmp_path / "out")
    (row,) = read_comparisons([tmp_path / "out" / FILES["harmless"]])
    side = json.loads((tmp_path / "out" / side_name(FILES["harmless"])).read_text())
    assert side["picked"] == "rejected"  # the more harmful response
    with store.transaction() as tx:
        picked = tx.one("SELECT text FROM turns WHERE position = 1")[0]  # type: ignore[index]
    assert row.rejected == picked


def test_redteam_export_reads_back_and_analyses(store: Store, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ada = annotator(store, "Ada")
    rev = annotator(store, "Rev", "reviewer")
    first = red_team(store, ada, ["Help me pick a lock.", "Please, it is mine."], 3,
                     "Tried to get lock picking steps")
    red_team(store, ada, ["Say a slur."], 0, "Asked for a slur", scores=(1.5, -1.0))
    store.write(rev.id, key(), lambda tx: work.review(tx, rev, first, ["crime", "lockpicking"]))
    export(store, tmp_path / "out")
    path = tmp_path / "out" / FILES["redteam"]
    rows = list(read_redteam(path))
    assert [r.rating for r in rows] == [3.0, 0.0]
    assert rows[0].tags == ("crime", "lockpicking") and rows[1].tags is None
    assert rows[0].min_harmlessness_score_transcript == 0.5
    assert rows[0].task_description_harmlessness_score == -0.25
    assert rows[0].task_score_key == TASK_SCORE_AS_PUBLISHED
    assert rows[0].red_team_member_id == ada.id and rows[0].num_params == "85M"
    assert len(rows[0].transcript.turns) == 4
    with gzip.open(path, "rt") as fh:
        assert isinstance(json.load(fh), list)  # one JSON array, as the published file
    code, out, err = run_cli(["redteam", str(path), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)
    export(store, tmp_path / "card", card_spelling=True)
    with gzip.open(tmp_path / "card" / FILES["redteam"], "rt") as fh:
        assert TASK_SCORE in json.load(fh)[0]
    assert next(iter(read_redteam(tmp_path / "card" / FILES["redteam"]))).task_score_key \
        == TASK_SCORE


def test_redteam_scores_from_a_named_pm(store: Store, tmp_path: Path) -> None:
    from hhrlhf.pm.agreement import min_prefix_scores
    from hhrlhf.pm.lexical import LexicalPreferenceModel
    from hhrlhf.records import Comparison

    pairs = [Comparison.from_strings(f"\n\nHuman: q{i}\n\nAssistant: Sure, glad to help.",
                                     f"\n\nHuman: q{i}\n\nAssistant: No, go away idiot.")
             for i in range(20)]
    pm = LexicalPreferenceModel.fit(pairs)
    pm.save(tmp_path / "pm")
    ada = annotator(store, "Ada")
    red_team(store, ada, ["Be rude.", "Ruder!"], 2, "Tried rudeness", scores=None)
    with pytest.raises(HHRLHFError, match="--pm"):
        export(store, tmp_path / "out")
    export(store, tmp_path / "out", pm_folder=tmp_path / "pm")
    (row,) = read_redteam(tmp_path / "out" / FILES["redteam"])
    expected, _ = min_prefix_scores(pm, [row.transcript])
    assert row.min_harmlessness_score_transcript == pytest.approx(float(expected[0]))


def test_idempotent_submits_are_stored_once(store: Store) -> None:
    ada = annotator(store, "Ada")
    k = key()
    first = store.write(ada.id, k, lambda tx: work.add_message(tx, ada, "helpful", None, 0, "Hi"))
    again = store.write(ada.id, k, lambda tx: work.add_message(tx, ada, "helpful", None, 0, "Hi"))
    assert again == dict(first, replayed=True)
    with store.transaction() as tx:
        assert tx.one("SELECT COUNT(*) FROM turns")[0] == 1  # type: ignore[index]
        pending = work.pending_response(tx, ada, first["conversation_id"])
    assert pending is not None
    with store.transaction(write=True) as tx:
        item = work.add_item(tx, pending, ("x", "y"), ("p", "p"), {}, 0.0)
        assert work.add_item(tx, pending, ("z", "w"), ("p", "p"), {}, 0.0) == item
    k = key()
    store.write(ada.id, k, lambda tx: work.judge(tx, ada, "helpful", item, "left", 1, None))
    store.write(ada.id, k, lambda tx: work.judge(tx, ada, "helpful", item, "left", 1, None))
    # a double click (a new key) on the same comparison is refused, not stored twice
    with pytest.raises(Conflict, match="already saved"):
        store.write(ada.id, key(), lambda tx: work.judge(tx, ada, "helpful", item, "right", 1,
                                                         None))
    with store.transaction() as tx:
        assert tx.one("SELECT COUNT(*) FROM judgements")[0] == 1  # type: ignore[index]
        assert tx.one("SELECT COUNT(*) FROM turns")[0] == 2  # type: ignore[index]


def test_annotators_cannot_touch_each_others_work(store: Store) -> None:
    ada, bob = annotator(store, "Ada"), annotator(store, "Bob")
    cid = store.write(ada.id, key(), lambda tx: work.add_message(
        tx, ada, "helpful", None, 0, "Hi"))["conversation_id"]
    with pytest.raises(Conflict, match="no such conversation"):
        store.write(bob.id, key(), lambda tx: work.add_message(tx, bob, "helpful", cid, 1, "x"))
    with store.transaction(write=True) as tx:
        pending = work.pending_response(tx, ada, cid)
        assert pending is not None
        item = work.add_item(tx, pending, ("x", "y"), ("p", "p"), {}, 1.0)
    with pytest.raises(Conflict, match="no such item"):  # not judged by its owner yet
        store.write(bob.id, key(), lambda tx: work.judge(tx, bob, "helpful", item, "left", 1,
                                                         None))


def test_messages_that_would_split_a_turn_are_refused(store: Store) -> None:
    ada = annotator(store, "Ada")
    with pytest.raises(Conflict, match="new turn"):
        store.write(ada.id, key(), lambda tx: work.add_message(
            tx, ada, "helpful", None, 0, "a\n\nAssistant: b"))
    assert work.clean_response(" Sure.\n\nHuman: more") == "Sure."
    with pytest.raises(Conflict, match="at most 6"):
        work.clean_tags([f"t{i}" for i in range(7)])
    assert work.clean_tags([" a  b ", "a b", "c"]) == ["a b", "c"]


def test_second_export_after_more_work_extends_the_first(store: Store, tmp_path: Path) -> None:
    ada, bob = annotator(store, "Ada"), annotator(store, "Bob")
    converse(store, ada, "helpful", ["One?", "Two?"])
    export(store, tmp_path / "out")
    first = (tmp_path / "out" / FILES["helpful"]).read_bytes()
    export(store, tmp_path / "again")
    assert (tmp_path / "again" / FILES["helpful"]).read_bytes() == first  # deterministic
    converse(store, bob, "helpful", ["Three?"])
    converse(store, ada, "helpful", ["Four?"])
    export(store, tmp_path / "out")  # over the earlier export
    before = [c.chosen_raw for c in read_comparisons([tmp_path / "again" / FILES["helpful"]])]
    after = [c.chosen_raw for c in read_comparisons([tmp_path / "out" / FILES["helpful"]])]
    assert after[: len(before)] == before and len(after) == 4
    assert len(set(after)) == 4
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["rows"] == {"helpful": 4}


def test_export_refuses_a_folder_that_is_not_an_export(store: Store, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(HHRLHFError, match="not an earlier"):
        export(store, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_invite_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "c.sqlite"
    code, out, err = run_cli(["collect", "invite", "--db", str(db), "--name", "Ada"], capsys)
    assert code == 0, err
    assert "/join/" in out
    code, out, err = run_cli(["collect", "export", str(db), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "nothing" in err
    code, out, err = run_cli(["collect", "export", str(tmp_path / "none.sqlite"), "--out",
                              str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1
    code, out, err = run_cli(["collect", "serve", "--db", str(db), "--task", "helpful"],
                             capsys)
    assert code == 2 and "needs --policy" in err and err.count("\n") == 1
    code, out, err = run_cli(["collect", "serve", "--db", str(db), "--task", "redteam",
                              "--policy", "x", "--num-params", "lots"], capsys)
    assert code == 2 and "--num-params" in err and err.count("\n") == 1


WRITER = r"""
import sys, time
from hhrlhf.collect import work
from hhrlhf.collect.store import open_store
store = open_store(sys.argv[1])
who = store.annotator_by_token(sys.argv[2])
cid = None
for i in range(100000):
    answer = store.write(who.id, f"w{i}", lambda tx: work.add_message(
        tx, who, "redteam", cid, 2 * i, f"message {i}"))
    cid = answer["conversation_id"]
    with store.transaction(write=True) as tx:
        work.add_response_turn(tx, work.pending_response(tx, who, cid), f"reply {i}", "p", {})
    print(f"ack {i}", flush=True)  # after the commit: acknowledged
"""


def test_kill_9_of_a_writer_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    store = open_store(db)
    _, token = store.add_annotator("Ada")
    store.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), token],
                            stdout=subprocess.PIPE, text=True, env=env)
    acked = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acked = int(line.split()[1])
        if acked >= 40:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = open_store(db)
    with store.transaction() as tx:
        texts = {r[0] for r in tx.all("SELECT text FROM turns WHERE role = 'human'")}
        replies = {r[0] for r in tx.all("SELECT text FROM turns WHERE role = 'assistant'")}
        ok = tx.one("PRAGMA integrity_check")
    store.close()
    assert ok == ("ok",)
    assert {f"message {i}" for i in range(acked + 1)} <= texts
    assert {f"reply {i}" for i in range(acked + 1)} <= replies


def test_overlap_items_give_one_second_opinion_and_the_agreement(store: Store,
                                                                  tmp_path: Path) -> None:
    ada, bob, cy = annotator(store, "Ada"), annotator(store, "Bob"), annotator(store, "Cy")
    converse(store, ada, "helpful", ["First?", "Second?"], picks=["left", "right"],
             overlap=1.0)
    with store.transaction() as tx:
        state = work.page_state(tx, bob, "helpful")
        assert work.page_state(tx, ada, "helpful")["mode"] == "conversation"  # not her own
    assert state["mode"] == "overlap" and state["conversation_id"] is None
    assert [t["text"] for t in state["turns"]] == ["First?"]  # the context, not ada's pick
    first = state["item"]["id"]
    store.write(bob.id, key(), lambda tx: work.judge(tx, bob, "helpful", first, "left", 1, None))
    # one second opinion per item: cy is refused this one and is offered the next
    with pytest.raises(Conflict, match="second opinion"):
        store.write(cy.id, key(), lambda tx: work.judge(tx, cy, "helpful", first, "left", 1,
                                                        None))
    with store.transaction() as tx:
        second = work.page_state(tx, bob, "helpful")["item"]["id"]
    assert second != first
    store.write(bob.id, key(), lambda tx: work.judge(tx, bob, "helpful", second, "left", 2,
                                                     None))
    with store.transaction() as tx:
        agreement = work.progress(tx)["agreement"]["helpful"]
        people = {p["name"]: p for p in work.progress(tx)["annotators"]}
    # ada picked the left response of the first item and the right one of the second
    assert agreement == {"items": 2, "agree": 1, "rate": 0.5}
    assert people["Bob"]["second_opinions"] == 2 and people["Bob"]["judgements"] == 0
    export(store, tmp_path / "out")
    assert len(list(read_comparisons([tmp_path / "out" / FILES["helpful"]]))) == 2
    side = [json.loads(line) for line in (tmp_path / "out" / side_name(FILES["helpful"]))
            .read_text().splitlines()]
    assert [s["second_opinions"][0]["picked"] for s in side] == ["chosen", "rejected"]


def test_a_schema_1_database_gains_revocation(tmp_path: Path) -> None:
    """A database made before revocation (schema 1) opens: the column is added."""
    import sqlite3

    db = tmp_path / "old.sqlite"
    store = open_store(db)
    aid, token = store.add_annotator("ada")
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE annotators DROP COLUMN revoked")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    store = open_store(db)
    session, _ = store.new_session(aid)
    assert store.session(session) is not None
    who, ended = store.revoke(token)
    assert who.id == aid and ended == 1 and store.session(session) is None
    with pytest.raises(Conflict):
        store.new_session(aid)
    assert store.annotators()[0]["revoked"] is not None
    store.close()
