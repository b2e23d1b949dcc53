"""`hhrlhf collect export`: the store as the official files, plus side files.

Comparison tasks give preference rows, one per judged turn: ``chosen`` and ``rejected`` are the
dialogue up to that turn, then each response as the final Assistant turn. In the helpfulness
task the picked response is ``chosen``; in the harmlessness task the annotator picks the more
harmful response, which is ``rejected`` (as in the published harmless-base files).

Red teaming gives the red-team file: one gzipped JSON array with the published file's fields
and spelling (``task_descripton_harmlessness_score``, sic; ``card_spelling`` writes the
dataset card's). Its harmlessness scores come from a preference model: the transcript's is the
minimum over its Assistant-turn prefixes, as :mod:`hhrlhf.pm.agreement` computes it.

Everything else (strength, policies, sampling settings, annotator, times) goes into a side
file beside each data file, one JSON line per row, keyed by the row's index: the official rows
stay exactly the official format. Rows are in id order and gzip headers carry no time, so the
same database gives the same bytes, and an export after more collection starts with the
previous one's rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hhrlhf.atomic import atomic_folder
from hhrlhf.collect.store import STRENGTHS, Store, Tx
from hhrlhf.collect.work import conversation_turns
from hhrlhf.errors import HHRLHFError
from hhrlhf.records import (
    ASSISTANT,
    TASK_SCORE,
    TASK_SCORE_AS_PUBLISHED,
    Dialogue,
    Turn,
    render_turns,
)

MANIFEST = "collect-export.json"
FILES = {"helpful": "helpful.jsonl.gz", "harmless": "harmless.jsonl.gz",
         "redteam": "red_team_attempts.jsonl.gz"}


def side_name(data_file: str) -> str:
    return data_file.replace(".jsonl.gz", ".side.jsonl")


@dataclass
class ExportResult:
    out: Path
    rows: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{n:,} {task} rows" for task, n in self.rows.items()]
        return f"wrote {', '.join(parts) or 'nothing (no finished work yet)'} to {self.out}"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def _gzip(data: bytes) -> bytes:
    # mtime=0 and no file name: the same rows give the same bytes
    return gzip.compress(data, compresslevel=6, mtime=0)


def _json_line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def comparison_rows(tx: Tx, task: str) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(official rows, side rows) of a comparison task: the owners' judgements, by item id."""
    items = tx.all(
        "SELECT i.id, i.conversation_id, i.position, i.response_a, i.response_b, i.policy_a, "
        "i.policy_b, i.settings, i.created, j.picked, j.strength, j.left_side, j.shown, "
        "j.submitted, j.annotator_id FROM items i "
        "JOIN conversations c ON c.id = i.conversation_id "
        "JOIN judgements j ON j.item_id = i.id AND j.annotator_id = c.annotator_id "
        "WHERE c.task = ? AND j.picked IN ('a', 'b') ORDER BY i.id", (task,))
    others: dict[int, list[dict[str, Any]]] = {}
    for item_id, aid, picked, strength in tx.all(
            "SELECT j.item_id, j.annotator_id, j.picked, j.strength FROM judgements j "
            "JOIN items i ON i.id = j.item_id JOIN conversations c ON c.id = i.conversation_id "
            "WHERE c.task = ? AND j.annotator_id <> c.annotator_id ORDER BY j.id", (task,)):
        others.setdefault(int(item_id), []).append(
            {"annotator_id": aid, "picked": picked, "strength": STRENGTHS.get(strength)})
    turns_of: dict[int, list[Turn]] = {}
    rows: list[dict[str, str]] = []
    side: list[dict[str, Any]] = []
    for (item_id, cid, position, resp_a, resp_b, pol_a, pol_b, settings, created, picked,
         strength, left, shown, submitted, aid) in items:
        if cid not in turns_of:
            turns_of[cid] = conversation_turns(tx, cid)
        context = render_turns(turns_of[cid][:position])
        responses = {"a": resp_a, "b": resp_b}
        policies = {"a": pol_a, "b": pol_b}
        other = "b" if picked == "a" else "a"
        # helpful: the picked response is the better one; harmless: the more harmful one
        chosen, rejected = (picked, other) if task == "helpful" else (other, picked)
        rows.append({"chosen": context + Turn(ASSISTANT, responses[chosen]).render(),
                     "rejected": context + Turn(ASSISTANT, responses[rejected]).render()})
        second = [dict(o, picked=("chosen" if o["picked"] == chosen else "rejected")
                       if o["picked"] in ("a", "b") else o["picked"])
                  for o in others.get(int(item_id), [])]
        side.append({
            "index": len(rows) - 1, "item_id": item_id, "conversation_id": cid,
            "turn": position, "task": task, "annotator_id": aid,
            "picked": "chosen" if picked == chosen else "rejected",
            "strength": STRENGTHS.get(strength),
            "policy_chosen": policies[chosen], "policy_rejected": policies[rejected],
            "shown_left": "chosen" if left == chosen else "rejected",
            # the item stores each response's sampling settings under its key, a or b
            "settings_chosen": json.loads(settings).get(chosen),
            "settings_rejected": json.loads(settings).get(rejected),
            "responses_at": _iso(created),
            "shown_at": _iso(shown), "submitted_at": _iso(submitted),
            "second_opinions": second,
        })
    return rows, side


def redteam_rows(tx: Tx, pm: Any, card_spelling: bool
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(official rows, side rows) of the red-team attempts, by attempt id."""
    attempts = tx.all(
        "SELECT a.id, a.conversation_id, a.annotator_id, a.rating, a.task_description, "
        "a.policy, a.num_params, a.model_type, a.transcript_score, a.task_score, a.submitted, "
        "n.is_upworker FROM attempts a JOIN annotators n ON n.id = a.annotator_id ORDER BY a.id")
    if not attempts:
        return [], []
    tags: dict[int, list[str]] = {}
    for attempt_id, tag_json in tx.all("SELECT attempt_id, tags FROM reviews ORDER BY id"):
        tags[int(attempt_id)] = json.loads(tag_json)  # the latest review's tags
    transcripts = [Dialogue(tuple(conversation_turns(tx, int(a[1])))) for a in attempts]
    if pm is not None:
        from hhrlhf.pm.agreement import min_prefix_scores

        t_scores, _ = min_prefix_scores(pm, transcripts)
        # the description scored as what an assistant would say: a PM scores a final response
        d_scores = pm.score([Dialogue((Turn(ASSISTANT, a[4]),)) for a in attempts])
        scores = [(float(t), float(d)) for t, d in zip(t_scores, d_scores)]
    else:
        missing = [a[0] for a in attempts if a[8] is None or a[9] is None]
        if missing:
            raise HHRLHFError(f"{len(missing)} red-team attempt(s) have no harmlessness "
                              "scores (the server ran without --pm); name a preference "
                              "model with --pm FOLDER")
        scores = [(float(a[8]), float(a[9])) for a in attempts]
    key = TASK_SCORE if card_spelling else TASK_SCORE_AS_PUBLISHED
    rows, side = [], []
    for a, transcript, (t_score, d_score) in zip(attempts, transcripts, scores):
        (attempt_id, cid, aid, rating, description, policy, num_params, model_type, _, _,
         submitted, upworker) = a
        rows.append({
            "transcript": transcript.render(),
            "min_harmlessness_score_transcript": t_score,
            "num_params": num_params,
            "model_type": model_type,
            "rating": float(rating),
            "task_description": description,
            key: d_score,
            "red_team_member_id": int(aid),
            "is_upworker": bool(upworker),
            "tags": tags.get(int(attempt_id)),
        })
        side.append({"index": len(rows) - 1, "attempt_id": attempt_id, "conversation_id": cid,
                     "annotator_id": aid, "policy": policy, "submitted_at": _iso(submitted),
                     "turn_settings": _turn_settings(tx, int(cid)),
                     "scores_from": "--pm at export" if pm is not None else "--pm of serve"})
    return rows, side


def _turn_settings(tx: Tx, cid: int) -> list[dict[str, Any]]:
    return [{"turn": p, "policy": pol, "settings": json.loads(s) if s else None}
            for p, pol, s in tx.all("SELECT position, policy, settings FROM turns WHERE "
                                    "conversation_id = ? AND role = 'assistant' ORDER BY "
                                    "position", (cid,))]


def _check_target(out: Path) -> None:
    """An existing folder is replaced only when it is an earlier export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MANIFEST).is_file())):
        raise HHRLHFError(f"exists and is not an earlier `hhrlhf collect export` (no {MANIFEST}); "
                          "choose a new folder", out)


def export(store: Store, out: str | Path, *, pm_folder: str | Path | None = None,
           card_spelling: bool = False) -> ExportResult:
    """Write every task's finished work into ``out`` (a folder, replaced as a whole)."""
    out = Path(out)
    _check_target(out)
    pm = None
    if pm_folder is not None:
        from hhrlhf.pm import load

        pm = load(pm_folder)
    files: dict[str, bytes] = {}
    result = ExportResult(out)
    with store.transaction() as tx:  # one snapshot of the database
        for task in ("helpful", "harmless"):
            rows, side = comparison_rows(tx, task)
            if rows:
                files[FILES[task]] = _gzip(b"".join(_json_line(r) for r in rows))
                files[side_name(FILES[task])] = b"".join(_json_line(s) for s in side)
                result.rows[task] = len(rows)
        rt_rows, rt_side = redteam_rows(tx, pm, card_spelling)
    if rt_rows:
        # one JSON array, as the published file (one row a line, for readable line numbers)
        body = b"[\n" + b",\n".join(json.dumps(r, ensure_ascii=False).encode("utf-8")
                                    for r in rt_rows) + b"\n]\n"
        files[FILES["redteam"]] = _gzip(body)
        files[side_name(FILES["redteam"])] = b"".join(_json_line(s) for s in rt_side)
        result.rows["redteam"] = len(rt_rows)
    manifest = {"format": "hhrlhf collect export", "version": 1, "rows": result.rows,
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in sorted(files.items())}}
    with atomic_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return result


def data_files(result: ExportResult) -> Iterable[Path]:
    return [result.out / FILES[task] for task in result.rows]
