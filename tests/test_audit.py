"""The audit: per-row and cross-row checks on the real file and on hand-made files, the CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from hhrlhf.audit import CHECKS, CROSS_ROW_CHECKS, RowRef, prompt_text, run_audit
from hhrlhf.read import read_comparisons
from hhrlhf.records import ROW_CHECKS, Comparison, Dialogue, render_turns, row_flags

ROOT = Path(__file__).resolve().parents[1]
HHRLHF = str(ROOT / ".venv" / "bin" / "hhrlhf")


def T(human: str, assistant: str) -> str:
    """A one-exchange dialogue string."""
    return f"\n\nHuman: {human}\n\nAssistant: {assistant}"


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HHRLHF, *args], capture_output=True, text=True, timeout=120,
                          check=False)


# --- the real file -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_records(real_file: Path) -> list:
    return list(read_comparisons(real_file))


def test_real_file_checks_match_their_definitions(real_records: list) -> None:
    result = run_audit(real_records)
    assert result.rows == 2312
    as_json = result.to_json()
    assert list(as_json["checks"]) == list(CHECKS)
    for name, entry in as_json["checks"].items():
        assert entry["count"] == len(entry["rows"]) == len(result.checks[name])

    # Re-derive every check from the records, independently of the audit's hashing.
    by_prompt: dict[str, list[int]] = defaultdict(list)
    by_pair: dict[tuple[str, str], list[int]] = defaultdict(list)
    expected: dict[str, set[int]] = {name: set() for name in CHECKS}
    for c in real_records:
        flags = row_flags(Dialogue.parse(c.chosen_raw), Dialogue.parse(c.rejected_raw))
        for name in flags:
            expected[name].add(c.index)
        by_prompt[render_turns(c.prompt)].append(c.index)
        by_pair[(c.chosen_raw, c.rejected_raw)].append(c.index)
    for group in by_prompt.values():
        if len(group) > 1:
            expected["repeated_prompt"].update(group)
    for group in by_pair.values():
        if len(group) > 1:
            expected["duplicate_pair"].update(group)
    for name in CHECKS:
        assert {r.index for r in result.checks[name]} == expected[name], name
    # One file, labelled by the records (a plain path: no subset, no split).
    assert all(r.subset is None and r.split is None for refs in result.checks.values()
               for r in refs)
    # The published test file's findings (the file is pinned byte for byte).
    counts = {name: result.count(name) for name in CHECKS}
    assert counts == {
        "identical_pair": 0, "identical_responses": 0, "empty_response": 4,
        "final_turn_not_assistant": 0, "context_mismatch": 5, "role_marker_in_text": 49,
        "non_alternating_roles": 9, "malformed_dialogue": 0, "duplicate_pair": 0,
        "repeated_prompt": 4, "train_test_overlap": 0,
    }
    identical_pairs = set(result.checks["identical_pair"])
    assert identical_pairs <= set(result.checks["identical_responses"])
    # flags_of agrees with the lists, row by row.
    listed: dict[int, set[str]] = defaultdict(set)
    for name, refs in result.checks.items():
        for r in refs:
            listed[r.index].add(name)
    for c in real_records:
        assert result.flags_of(c) == listed[c.index], c.index


def test_prompt_text_is_the_rendered_prompt(real_records: list) -> None:
    for c in real_records:
        assert prompt_text(c) == render_turns(c.prompt), c.index


# --- hand-made files: every check fires exactly where expected ------------------------------

HARMLESS_TRAIN = [
    (T("p0", "good"), T("p0", "bad")),                                   # 0 (prompt again: 10)
    (T("p1", "same"), T("p1", "same")),                                  # 1 identical pair
    (T("p2a", "same"), T("p2b", "same")),                                # 2 same responses
    (T("p3", "fine"), "\n\nHuman: p3\n\nAssistant:"),                    # 3 empty response
    ("\n\nHuman: p4\n\nAssistant: a\n\nHuman: more", T("p4", "b")),     # 4 ends with Human
    (T("p5 Human: inner", "x"), T("p5 Human: inner", "y")),              # 5 marker in text
    ("\n\nHuman: p6\n\nHuman: again\n\nAssistant: x",
     "\n\nHuman: p6\n\nHuman: again\n\nAssistant: y"),                  # 6 not alternating
    ("pre" + T("p7", "x"), "pre" + T("p7", "y")),                        # 7 preamble
    (T("p8", "x"), T("p8", "y")),                                        # 8 duplicate of 9
    (T("p8", "x"), T("p8", "y")),                                        # 9
    (T("p0", "other"), T("p0", "worse")),                                # 10 prompt of 0
    (T("shared", "x"), T("shared", "y")),                                # 11 also in test
]
HARMLESS_TEST = [
    (T("shared", "u"), T("shared", "v")),                                # 0 also in train
    (T("cross", "u"), T("cross", "v")),                                  # 1 in helpful train
    (T("only in test", "u"), T("only in test", "v")),                    # 2
]
HELPFUL_TRAIN = [
    (T("cross", "a"), T("cross", "b")),                                  # 0 in harmless test
    (T("helpful only", "a"), T("helpful only", "b")),                    # 1
]

HB_TR, HB_TE, HE_TR = ("harmless-base", "train"), ("harmless-base", "test"), ("helpful-base",
                                                                              "train")
EXPECTED: dict[str, set[tuple[str, str, int]]] = {
    "identical_pair": {(*HB_TR, 1)},
    "identical_responses": {(*HB_TR, 1), (*HB_TR, 2)},
    "empty_response": {(*HB_TR, 3), (*HB_TR, 4)},
    "final_turn_not_assistant": {(*HB_TR, 4)},
    "context_mismatch": {(*HB_TR, 2), (*HB_TR, 4)},
    "role_marker_in_text": {(*HB_TR, 5)},
    "non_alternating_roles": {(*HB_TR, 6)},
    "malformed_dialogue": {(*HB_TR, 7)},
    "duplicate_pair": {(*HB_TR, 8), (*HB_TR, 9)},
    "repeated_prompt": {(*HB_TR, 0), (*HB_TR, 10), (*HB_TR, 8), (*HB_TR, 9), (*HB_TR, 11),
                        (*HB_TE, 0), (*HB_TE, 1), (*HE_TR, 0)},
    "train_test_overlap": {(*HB_TR, 11), (*HB_TE, 0), (*HB_TE, 1), (*HE_TR, 0)},
}


def _as_sets(checks: dict) -> dict[str, set[tuple[str, str, int]]]:
    return {name: {(r["subset"], r["split"], r["index"]) for r in entry["rows"]}
            for name, entry in checks.items()}


def _labelled(rows: list[tuple[str, str]], subset: str, split: str) -> list[Comparison]:
    return [Comparison.from_strings(c, r, subset=subset, split=split, index=i, line=i + 1)
            for i, (c, r) in enumerate(rows)]


def test_every_check_fires_exactly_where_expected() -> None:
    records = (_labelled(HARMLESS_TRAIN, *HB_TR) + _labelled(HARMLESS_TEST, *HB_TE)
               + _labelled(HELPFUL_TRAIN, *HE_TR))
    result = run_audit(iter(records))
    assert result.rows == len(records)
    assert {n: {(r.subset, r.split, r.index) for r in refs}
            for n, refs in result.checks.items()} == EXPECTED
    for c in records:
        want = {n for n, refs in EXPECTED.items() if (c.subset, c.split, c.index) in refs}
        assert result.flags_of(c) == want, (c.subset, c.split, c.index)
    out = result.to_json()
    assert set(out) == {"rows", "checks"} and out["rows"] == len(records)
    assert list(out["checks"]) == list(CHECKS)
    for name, entry in out["checks"].items():
        assert set(entry) == {"count", "rows"}
        assert entry["count"] == len(entry["rows"]) == len(EXPECTED[name])
        for r in entry["rows"]:
            assert set(r) == {"subset", "split", "index"}
    assert json.loads(json.dumps(out)) == out  # plain JSON types only


@pytest.fixture
def made_cache(seeded_cache: Path, real_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real harmless-base test file, and a hand-made harmless-base train file (pinned on
    purpose by $HHRLHF_PINS: the real file's pin refuses it) holding the real test file's
    prompt of row 0 (row 12 here) and its whole row 7 (row 13 here)."""
    from redteam_gen import write_pins

    real = list(read_comparisons(real_file))
    made = HARMLESS_TRAIN + [
        (render_turns(real[0].prompt) + "\n\nAssistant: made up", real[0].rejected_raw),
        (real[7].chosen_raw, real[7].rejected_raw),
    ]
    train = write_rows(seeded_cache / "data" / "harmless-base" / "train.jsonl.gz", made)
    pins = write_pins(seeded_cache / "pins.tsv", {"harmless-base/train.jsonl.gz": train})
    monkeypatch.setenv("HHRLHF_PINS", str(pins))
    return seeded_cache


def test_cli_audits_the_cache_by_subset_and_split(made_cache: Path) -> None:
    proc = run("audit", "--json")  # no sources: every preference file in the cache
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"rows", "checks"}
    assert out["rows"] == len(HARMLESS_TRAIN) + 2 + 2312
    found = _as_sets(out["checks"])
    assert found["train_test_overlap"] == {(*HB_TR, 12), (*HB_TR, 13), (*HB_TE, 0), (*HB_TE, 7)}
    assert found["duplicate_pair"] == {(*HB_TR, 8), (*HB_TR, 9), (*HB_TR, 13), (*HB_TE, 7)}
    for name in ("identical_pair", "final_turn_not_assistant", "malformed_dialogue"):
        assert found[name] == EXPECTED[name]  # the real test file has none of these
    assert {r for r in found["repeated_prompt"] if r[1] == "train"} == {
        (*HB_TR, i) for i in (0, 8, 9, 10, 12, 13)}

    # Named by subset; --split filters; within one split there is no train/test overlap.
    proc = run("audit", "harmless-base", "--split", "train", "--json")
    only_train = json.loads(proc.stdout)
    assert only_train["rows"] == len(HARMLESS_TRAIN) + 2
    assert only_train["checks"]["train_test_overlap"]["count"] == 0
    assert {r["index"] for r in only_train["checks"]["repeated_prompt"]["rows"]} == {
        0, 8, 9, 10}


def test_plain_paths_are_named_by_path_and_split_by_file_name(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "a" / "train.jsonl", HARMLESS_TRAIN[10:])
    test = write_rows(tmp_path / "b" / "test.jsonl.gz", HARMLESS_TEST)
    other = write_rows(tmp_path / "c" / "extra.jsonl", [HARMLESS_TEST[0]])
    proc = run("audit", str(train), str(test), str(other), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    overlap = {(r["subset"], r["split"], r["index"])
               for r in out["checks"]["train_test_overlap"]["rows"]}
    # "shared" is in train row 1 and test row 0, so every row holding it is listed: extra.jsonl
    # (no split in its name) too, as it carries that prompt.
    assert overlap == {(str(train), None, 1), (str(test), None, 0), (str(other), None, 0)}
    repeated = {(r["subset"], r["index"]) for r in out["checks"]["repeated_prompt"]["rows"]}
    assert repeated == {(str(train), 1), (str(test), 0), (str(other), 0)}
    dup = {(r["subset"], r["index"]) for r in out["checks"]["duplicate_pair"]["rows"]}
    assert dup == {(str(test), 0), (str(other), 0)}


def test_table_output_and_fail_on_gate(made_cache: Path, real_file: Path) -> None:
    proc = run("audit", str(real_file))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"audit: 2,312 rows from {real_file}"
    row = {ln.split()[0]: ln.split()[1] for ln in lines[3:3 + len(CHECKS)]}
    assert list(row) == list(CHECKS)
    assert row["role_marker_in_text"] == "49" and row["empty_response"] == "4"

    fired = run("audit", str(real_file), "--fail-on", "duplicate_pair",
                "--fail-on", "identical_pair,empty_response")
    assert fired.returncode == 1
    assert fired.stderr.strip() == "hhrlhf: audit failed: empty_response (4 rows)"
    assert run("audit", str(real_file), "--fail-on", "duplicate_pair,identical_pair",
               "--json").returncode == 0
    assert run("audit", "--fail-on", "all").returncode == 1  # the made cache fires several

    bad = run("audit", str(real_file), "--fail-on", "no_such_check")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("hhrlhf: error: unknown check 'no_such_check'")


def test_bad_input_is_one_line(tmp_path: Path, cache: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"chosen": T("a", "b"), "rejected": T("a", "c")})
                      + "\n{not json\n")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "x"}) + "\n")
    cases = {
        (str(tmp_path / "missing.jsonl"),): "no such file",
        (str(broken),): f"{broken}:2: not valid JSON",
        (str(wrong),): f"{wrong}:1: missing key 'chosen'",
        (): "no preference file in the cache",  # the empty cache
        ("red-team-attempts",): "holds no preference rows",
        ("harmless-base",): "not in the cache",
    }
    for args, message in cases.items():
        proc = run("audit", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)


def test_rowref_and_cross_check_names() -> None:
    assert CHECKS == ROW_CHECKS + CROSS_ROW_CHECKS
    ref = RowRef("harmless-base", "test", 3)
    assert str(ref) == "harmless-base/test#3"
    assert ref.to_json() == {"subset": "harmless-base", "split": "test", "index": 3}
    with pytest.raises(AttributeError):
        ref.index = 4  # type: ignore[misc]
