"""What annotators do, as transactions on the store: write a turn, get responses, pick one,
close a red-team attempt, tag one. Each function takes the open transaction (:class:`Tx`), so
the caller runs it inside :meth:`Store.write` (idempotent, durable before the answer).

A conversation's turns are the path the annotator took: their messages and, after each, the
response they picked (comparison tasks) or the one response (red teaming). An *item* is the
pair of responses offered at one turn; a *judgement* is one annotator's pick on an item. The
conversation's owner judges every item of it; a share of items (``overlap``) is also shown to
one other annotator of the same task, for the agreement on the admin page.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from hhrlhf.collect.store import (
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_TEXT_CHARS,
    STRENGTHS,
    Annotator,
    Conflict,
    Tx,
)
from hhrlhf.records import ASSISTANT, HUMAN, Dialogue, Turn

# A blank line then a role marker starts a new turn in the file format: inside a text it would
# split the turn when the row is read back.
_TURN_BREAK = re.compile(r"\n\n(?:Human|Assistant):")


def clean_message(text: str) -> str:
    """An annotator's message as stored, or Conflict(400) saying what is wrong with it."""
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise Conflict("the message is empty", 400)
    if len(text) > MAX_TEXT_CHARS:
        raise Conflict(f"the message is longer than {MAX_TEXT_CHARS:,} characters", 400)
    if _TURN_BREAK.search(text):
        raise Conflict("a blank line followed by 'Human:' or 'Assistant:' would start a new "
                       "turn in the data; rephrase that line", 400)
    return text


def clean_response(text: str) -> str:
    """A model's response as stored: cut where it starts a new turn, outer space removed."""
    m = _TURN_BREAK.search(text)
    return (text[: m.start()] if m else text).strip()


def conversation_turns(tx: Tx, conversation_id: int) -> list[Turn]:
    rows = tx.all("SELECT role, text FROM turns WHERE conversation_id = ? ORDER BY position",
                  (conversation_id,))
    return [Turn(HUMAN if r[0] == HUMAN else ASSISTANT, r[1]) for r in rows]


def _owned_conversation(tx: Tx, who: Annotator, conversation_id: int) -> tuple[str, str]:
    """(task, status) of a conversation of ``who``; another's is "not found" (never shown)."""
    row = tx.one("SELECT task, status FROM conversations WHERE id = ? AND annotator_id = ?",
                 (conversation_id, who.id))
    if row is None:
        raise Conflict("no such conversation", 404)
    return row[0], row[1]


def open_conversation(tx: Tx, who: Annotator, task: str) -> int | None:
    row = tx.one("SELECT id FROM conversations WHERE annotator_id = ? AND task = ? AND "
                 "status = 'open' ORDER BY id DESC LIMIT 1", (who.id, task))
    return None if row is None else int(row[0])


def add_message(tx: Tx, who: Annotator, task: str, conversation_id: int | None,
                position: int, text: str) -> dict[str, Any]:
    """The annotator's next message. ``position`` is the number of turns the page showed: a
    page that is behind (another tab went on) gets a 409 and reloads."""
    text = clean_message(text)
    now = time.time()
    if conversation_id is None:
        if position != 0 or open_conversation(tx, who, task) is not None:
            # a page that missed the start of the current conversation (another tab)
            raise Conflict("the conversation on this page is not the current one; reload")
        conversation_id = tx.insert("INSERT INTO conversations (annotator_id, task, status, "
                                    "created) VALUES (?, ?, 'open', ?)", (who.id, task, now))
    else:
        c_task, status = _owned_conversation(tx, who, conversation_id)
        if status != "open" or c_task != task:
            raise Conflict("this conversation is closed; start a new one")
    turns = conversation_turns(tx, conversation_id)
    if len(turns) != position:
        raise Conflict("the conversation went on elsewhere (another tab?); reload")
    if turns and turns[-1].role == HUMAN:
        raise Conflict("waiting for the assistant's response to the last message")
    tx.execute("INSERT INTO turns (conversation_id, position, role, text, created) "
               "VALUES (?, ?, 'human', ?, ?)", (conversation_id, position, text, now))
    return {"conversation_id": conversation_id, "position": position + 1}


@dataclass(frozen=True)
class Pending:
    """A conversation waiting for a response: its id, the dialogue so far, the position the
    response will take."""

    conversation_id: int
    dialogue: Dialogue
    position: int


def pending_response(tx: Tx, who: Annotator, conversation_id: int) -> Pending | None:
    """The conversation of ``who`` if its last turn is the annotator's and has no response
    (nor, in comparison tasks, an item) yet; None when there is nothing to generate."""
    _, status = _owned_conversation(tx, who, conversation_id)
    if status != "open":
        return None
    turns = conversation_turns(tx, conversation_id)
    if not turns or turns[-1].role != HUMAN:
        return None
    if tx.one("SELECT id FROM items WHERE conversation_id = ? AND position = ?",
              (conversation_id, len(turns))) is not None:
        return None
    return Pending(conversation_id, Dialogue(tuple(turns)), len(turns))


def add_item(tx: Tx, pending: Pending, responses: tuple[str, str], policies: tuple[str, str],
             settings: dict[str, Any], overlap_share: float, left: str | None = None) -> int:
    """Store the two responses offered at ``pending.position``, ``left`` ('a' or 'b', random
    when None) the one shown on the left; the item's id. A second generation for the same
    turn (two tabs) keeps the first."""
    row = tx.one("SELECT id FROM items WHERE conversation_id = ? AND position = ?",
                 (pending.conversation_id, pending.position))
    if row is not None:
        return int(row[0])
    rng = random.SystemRandom()
    return tx.insert(
        "INSERT INTO items (conversation_id, position, response_a, response_b, policy_a, "
        "policy_b, settings, left_side, overlap, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (pending.conversation_id, pending.position, clean_response(responses[0]),
         clean_response(responses[1]), policies[0], policies[1], json.dumps(settings),
         left or rng.choice("ab"), int(rng.random() < overlap_share), time.time()))


def add_response_turn(tx: Tx, pending: Pending, text: str, policy: str,
                      settings: dict[str, Any]) -> None:
    """The one response of a red-team turn, appended to the conversation."""
    if tx.one("SELECT 1 FROM turns WHERE conversation_id = ? AND position = ?",
              (pending.conversation_id, pending.position)) is not None:
        return  # another tab generated it first
    tx.execute("INSERT INTO turns (conversation_id, position, role, text, policy, settings, "
               "created) VALUES (?, ?, 'assistant', ?, ?, ?, ?)",
               (pending.conversation_id, pending.position, clean_response(text), policy,
                json.dumps(settings), time.time()))


def _item(tx: Tx, item_id: int) -> dict[str, Any] | None:
    row = tx.one("SELECT i.id, i.conversation_id, i.position, i.response_a, i.response_b, "
                 "i.left_side, i.overlap, c.annotator_id, c.task, c.status FROM items i "
                 "JOIN conversations c ON c.id = i.conversation_id WHERE i.id = ?", (item_id,))
    if row is None:
        return None
    keys = ("id", "conversation_id", "position", "response_a", "response_b", "left_side",
            "overlap", "owner", "task", "status")
    return dict(zip(keys, row))


def judge(tx: Tx, who: Annotator, task: str, item_id: int, side: str, strength: int,
          shown: float | None) -> dict[str, Any]:
    """``who`` picks the response shown on ``side`` (left/right; or 'skip' an overlap item)
    of an item. The owner's pick goes into the conversation, which goes on from it."""
    item = _item(tx, item_id)
    if item is None or item["task"] != task:
        raise Conflict("no such item", 404)
    owner = item["owner"] == who.id
    if not owner and not _may_see_overlap(tx, who, item):
        raise Conflict("no such item", 404)  # another annotator's: not even its existence
    if side not in ("left", "right", "skip") or (side == "skip" and owner):
        raise Conflict("pick 'left' or 'right'", 400)
    if side != "skip" and strength not in STRENGTHS:
        raise Conflict(f"strength is one of {sorted(STRENGTHS)}", 400)
    if tx.one("SELECT 1 FROM judgements WHERE item_id = ? AND annotator_id = ?",
              (item_id, who.id)) is not None:
        raise Conflict("this comparison is already saved")
    left = item["left_side"]
    picked = "skip" if side == "skip" else left if side == "left" else "b" if left == "a" else "a"
    if owner:
        if item["status"] != "open":
            raise Conflict("this conversation is closed; start a new one")
        tx.execute("INSERT INTO turns (conversation_id, position, role, text, created) "
                   "VALUES (?, ?, 'assistant', ?, ?)",
                   (item["conversation_id"], item["position"], item[f"response_{picked}"],
                    time.time()))
    tx.insert("INSERT INTO judgements (item_id, annotator_id, picked, strength, left_side, "
              "shown, submitted) VALUES (?, ?, ?, ?, ?, ?, ?)",
              (item_id, who.id, picked, 0 if side == "skip" else strength, left, shown,
               time.time()))
    return {"saved": True, "item_id": item_id,
            "position": item["position"] + 1 if owner else None}


def _may_see_overlap(tx: Tx, who: Annotator, item: dict[str, Any]) -> bool:
    """An overlap item is open to one second annotator, after its owner judged it."""
    if not item["overlap"] or tx.one(
            "SELECT 1 FROM judgements WHERE item_id = ? AND annotator_id = ?",
            (item["id"], item["owner"])) is None:
        return False
    count = tx.one("SELECT COUNT(*) FROM judgements WHERE item_id = ?", (item["id"],))
    if count is not None and count[0] >= 2:
        raise Conflict("another annotator gave this second opinion first; reload")
    return True


def finish(tx: Tx, who: Annotator, task: str, conversation_id: int) -> dict[str, Any]:
    """End a comparison conversation (the annotator starts a new one, or stops)."""
    c_task, status = _owned_conversation(tx, who, conversation_id)
    if c_task != task:
        raise Conflict("no such conversation", 404)
    if status == "open":
        tx.execute("UPDATE conversations SET status = 'done', finished = ? WHERE id = ?",
                   (time.time(), conversation_id))
    return {"finished": conversation_id}


def close_attempt(tx: Tx, who: Annotator, conversation_id: int, rating: int,
                  task_description: str, policy: str, num_params: str, model_type: str,
                  scores: tuple[float, float] | None) -> dict[str, Any]:
    """Close a red-team attempt with the red-teamer's rating of success (0-4) and their
    description of what they tried."""
    c_task, status = _owned_conversation(tx, who, conversation_id)
    if c_task != "redteam":
        raise Conflict("no such attempt", 404)
    if status != "open":
        raise Conflict("this attempt is closed already")
    if not isinstance(rating, int) or not 0 <= rating <= 4:
        raise Conflict("the rating is a whole number from 0 to 4", 400)
    description = clean_message(task_description)
    turns = conversation_turns(tx, conversation_id)
    if not any(t.role == ASSISTANT for t in turns):
        raise Conflict("an attempt needs at least one response from the assistant", 400)
    now = time.time()
    tx.execute("UPDATE conversations SET status = 'done', finished = ? WHERE id = ?",
               (now, conversation_id))
    attempt = tx.insert(
        "INSERT INTO attempts (conversation_id, annotator_id, rating, task_description, policy, "
        "num_params, model_type, transcript_score, task_score, submitted) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (conversation_id, who.id, rating, description, policy, num_params, model_type,
         None if scores is None else scores[0], None if scores is None else scores[1], now))
    return {"attempt_id": attempt}


def clean_tags(tags: list[Any]) -> list[str]:
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str):
            raise Conflict("tags are strings", 400)
        t = " ".join(t.split())
        if not t:
            continue
        if len(t) > MAX_TAG_CHARS:
            raise Conflict(f"a tag is at most {MAX_TAG_CHARS} characters", 400)
        if t not in out:
            out.append(t)
    if not out:
        raise Conflict("pick at least one tag", 400)
    if len(out) > MAX_TAGS:
        raise Conflict(f"at most {MAX_TAGS} tags", 400)
    return out


def review(tx: Tx, who: Annotator, attempt_id: int, tags: list[Any]) -> dict[str, Any]:
    cleaned = clean_tags(tags)
    if tx.one("SELECT 1 FROM attempts WHERE id = ?", (attempt_id,)) is None:
        raise Conflict("no such attempt", 404)
    if tx.one("SELECT 1 FROM reviews WHERE attempt_id = ? AND reviewer_id = ?",
              (attempt_id, who.id)) is not None:
        raise Conflict("this attempt is tagged already")
    tx.insert("INSERT INTO reviews (attempt_id, reviewer_id, tags, submitted) "
              "VALUES (?, ?, ?, ?)", (attempt_id, who.id, json.dumps(cleaned), time.time()))
    return {"attempt_id": attempt_id, "tags": cleaned}


# -- what a page shows ---------------------------------------------------------------------------

def overlap_item_for(tx: Tx, who: Annotator, task: str) -> int | None:
    """An overlap item for ``who``: another annotator's, already judged by its owner, not by
    ``who``, with no second judgement yet."""
    row = tx.one(
        "SELECT i.id FROM items i JOIN conversations c ON c.id = i.conversation_id "
        "WHERE i.overlap = 1 AND c.task = ? AND c.annotator_id <> ? "
        "AND EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = i.id "
        "            AND j.annotator_id = c.annotator_id) "
        "AND (SELECT COUNT(*) FROM judgements j WHERE j.item_id = i.id) < 2 "
        "ORDER BY i.id LIMIT 1", (task, who.id))
    return None if row is None else int(row[0])


def item_view(tx: Tx, item_id: int) -> dict[str, Any]:
    """An item as the page shows it: left and right, never which policy or which is 'a'."""
    from hhrlhf.explorer.diff import word_diff

    item = _item(tx, item_id)
    assert item is not None
    left_key = item["left_side"]
    right_key = "b" if left_key == "a" else "a"
    left, right = item[f"response_{left_key}"], item[f"response_{right_key}"]
    dl, dr = word_diff(left, right)
    return {"id": item_id, "left": left, "right": right,
            "left_segments": dl, "right_segments": dr}


def page_state(tx: Tx, who: Annotator, task: str) -> dict[str, Any]:
    """Everything the task page needs to show where the annotator is (also after a reload)."""
    if task in ("helpful", "harmless"):
        overlap = overlap_item_for(tx, who, task)
        if overlap is not None:
            item = _item(tx, overlap)
            assert item is not None
            turns = conversation_turns(tx, item["conversation_id"])[: item["position"]]
            return {"mode": "overlap", "conversation_id": None,
                    "turns": [{"role": t.role, "text": t.text} for t in turns],
                    "item": item_view(tx, overlap), "needs_response": False}
    cid = open_conversation(tx, who, task)
    turns = [] if cid is None else conversation_turns(tx, cid)
    item = None
    needs_response = False
    if turns and turns[-1].role == HUMAN:
        row = tx.one("SELECT id FROM items WHERE conversation_id = ? AND position = ?",
                     (cid, len(turns)))
        if row is not None and task != "redteam":
            item = item_view(tx, int(row[0]))
        else:
            needs_response = True
    done = tx.one("SELECT COUNT(*) FROM judgements WHERE annotator_id = ?", (who.id,))
    attempts = tx.one("SELECT COUNT(*) FROM attempts WHERE annotator_id = ?", (who.id,))
    return {"mode": "conversation", "conversation_id": cid,
            "turns": [{"role": t.role, "text": t.text} for t in turns],
            "item": item, "needs_response": needs_response,
            "done": {"judgements": int(done[0]) if done else 0,
                     "attempts": int(attempts[0]) if attempts else 0}}


def next_for_review(tx: Tx, who: Annotator) -> dict[str, Any] | None:
    """The oldest closed attempt that ``who`` has not tagged, fewest reviews first."""
    row = tx.one(
        "SELECT a.id, a.conversation_id, a.rating, a.task_description FROM attempts a "
        "WHERE NOT EXISTS (SELECT 1 FROM reviews r WHERE r.attempt_id = a.id "
        "                  AND r.reviewer_id = ?) "
        "ORDER BY (SELECT COUNT(*) FROM reviews r WHERE r.attempt_id = a.id), a.id LIMIT 1",
        (who.id,))
    if row is None:
        return None
    turns = conversation_turns(tx, int(row[1]))
    return {"attempt_id": int(row[0]), "rating": int(row[2]), "task_description": row[3],
            "turns": [{"role": t.role, "text": t.text} for t in turns]}


def progress(tx: Tx) -> dict[str, Any]:
    """The admin page: work per annotator and task, and agreement on overlap items."""
    people = {r[0]: {"id": r[0], "name": r[1], "role": r[2], "consented": r[3] is not None,
                     "revoked": r[4], "conversations": {}, "judgements": 0,
                     "second_opinions": 0, "judgements_by_task": {},
                     "attempts": 0, "reviews": 0, "last": None}
              for r in tx.all("SELECT id, name, role, consented, revoked FROM annotators "
                              "ORDER BY id")}

    def last(aid: int, t: float | None) -> None:
        if t is not None and aid in people:
            p = people[aid]
            p["last"] = t if p["last"] is None else max(p["last"], t)

    for aid, task, n in tx.all("SELECT annotator_id, task, COUNT(*) FROM conversations "
                               "GROUP BY annotator_id, task"):
        people[aid]["conversations"][task] = int(n)
    for aid, task, own, n, t in tx.all(
            "SELECT j.annotator_id, c.task, CASE WHEN c.annotator_id = j.annotator_id THEN 1 "
            "ELSE 0 END, COUNT(*), MAX(j.submitted) FROM judgements j "
            "JOIN items i ON i.id = j.item_id JOIN conversations c ON c.id = i.conversation_id "
            "GROUP BY 1, 2, 3"):
        p = people[aid]
        p["judgements" if own else "second_opinions"] += int(n)
        if own:
            p["judgements_by_task"][task] = int(n)
        last(aid, t)
    for aid, n, t in tx.all("SELECT annotator_id, COUNT(*), MAX(submitted) FROM attempts "
                            "GROUP BY annotator_id"):
        people[aid]["attempts"] = int(n)
        last(aid, t)
    for aid, n, t in tx.all("SELECT reviewer_id, COUNT(*), MAX(submitted) FROM reviews "
                            "GROUP BY reviewer_id"):
        people[aid]["reviews"] = int(n)
        last(aid, t)
    totals: dict[str, dict[str, int]] = {}
    for task, status, n in tx.all("SELECT task, status, COUNT(*) FROM conversations "
                                  "GROUP BY task, status"):
        totals.setdefault(task, {})[status] = int(n)
    return {"annotators": list(people.values()), "conversations": totals,
            "agreement": agreement(tx)}


def agreement(tx: Tx) -> dict[str, Any]:
    """Per task: overlap items judged by two annotators (skips left out), and the share on
    which the second annotator picked the same response as the owner."""
    rows = tx.all(
        "SELECT c.task, i.id, j.picked, CASE WHEN j.annotator_id = c.annotator_id THEN 1 "
        "ELSE 0 END FROM items i JOIN conversations c ON c.id = i.conversation_id "
        "JOIN judgements j ON j.item_id = i.id WHERE i.overlap = 1 AND j.picked <> 'skip' "
        "ORDER BY i.id")
    by_item: dict[int, tuple[str, dict[int, str]]] = {}
    for task, item, picked, own in rows:
        by_item.setdefault(int(item), (task, {}))[1][int(own)] = picked
    out: dict[str, dict[str, Any]] = {}
    for task, picks in by_item.values():
        if 0 in picks and 1 in picks:
            t = out.setdefault(task, {"items": 0, "agree": 0})
            t["items"] += 1
            t["agree"] += int(picks[0] == picks[1])
    for t in out.values():
        t["rate"] = t["agree"] / t["items"]
    return out
