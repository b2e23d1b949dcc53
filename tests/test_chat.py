"""`hhrlhf chat`: the real command in a real subprocess, its stdin a pipe (or a terminal): a
reply per line as it comes, the same replies `hhrlhf generate` gives, A/B picks saved as
preference rows that the data layer reads back."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from policy_support import (
    ENV,
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
    run_cli,
)

from hhrlhf.read import read_comparisons
from hhrlhf.records import HUMAN, Turn

HHRLHF = Path(sys.executable).parent / "hhrlhf"
WAIT = 300  # seconds a reply may take on a loaded machine before the test fails, not a timing


@pytest.fixture(scope="module")
def tiny(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    policy = build_tiny(first_rows(real_file, 300), folder)
    # an untied random LM head (as test_policy_generate's): replies of varied tokens
    torch.manual_seed(3)
    net = policy.net
    net.config.tie_word_embeddings = False
    net.lm_head.weight = torch.nn.Parameter(torch.randn_like(net.lm_head.weight))
    policy.save(folder)
    return folder


class ChatProcess:
    """`hhrlhf chat ARGS` with pipes; stdout read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path):
        self.proc = subprocess.Popen([str(HHRLHF), "chat", "--policy", *args], cwd=cwd,
                                     env={**ENV, "PYTHONIOENCODING": "utf-8"},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # bytes: split at "\n" only
            self.lines.put(line.decode("utf-8").removesuffix("\n"))
        self.lines.put(None)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()

    def reply(self) -> str:
        try:
            line = self.lines.get(timeout=WAIT)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("no reply before stdin closed") from None
        assert line is not None, self.finish()[1]
        return line

    def finish(self) -> tuple[int, str]:
        """Close stdin (EOF ends the chat); (exit status, stderr)."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=WAIT)
        return code, self.proc.stderr.read().decode("utf-8")


def shown(response: str) -> str:
    """A response as chat pipes it: one line, without the turn's leading space."""
    return response.removeprefix(" ").replace("\n", "\\n").replace("\r", "\\r")


def test_a_reply_per_line_equal_to_generate(tiny: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    knobs = ["--temperature", "0", "--max-new-tokens", "8", "--max-prompt-length", "12"]
    chat = ChatProcess([str(tiny), *knobs], tmp_path)
    chat.send("Hi there")
    first = chat.reply()  # read before the next line is written: a reply per line, not at EOF
    chat.send("How do I bake bread?")
    second = chat.reply()
    chat.send("And then?")
    chat.reply()
    chat.send("/reset")
    chat.send("Hi there")
    again = chat.reply()
    chat.send("/save saved.jsonl")
    code, err = chat.finish()
    assert code == 0, err
    assert again == first  # /reset: the same first turn, the same (greedy) reply

    def generated(dialogue: str) -> dict[str, str]:
        code, out, err = run_cli(["generate", "--policy", str(tiny), *knobs], capsys, monkeypatch,
                                 stdin=json.dumps({"text": dialogue}) + "\n")
        assert code == 0, err
        row: dict[str, str] = json.loads(out)
        return row

    g1 = generated("\n\nHuman: Hi there")
    g2 = generated(g1["text"] + "\n\nHuman: How do I bake bread?")
    assert first == shown(g1["response"]) and first
    assert second == shown(g2["response"]) and second
    # the prompt lost its start from the second turn on (12 tokens kept): said once
    assert err.count("is left out") == 1
    rows = [json.loads(x) for x in (tmp_path / "saved.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # both conversations, as {"text"} rows
    assert rows[0]["text"].startswith(g2["text"]) and rows[1] == {"text": g1["text"]}


def test_two_replies_a_pick_and_save_give_preference_rows(tiny: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("not the chat's\n")
    chat = ChatProcess([str(tiny), "--n", "2", "--max-new-tokens", "8", "--seed", "1"], tmp_path)
    chat.send("Hi there")
    a1, b1 = chat.reply(), chat.reply()
    chat.send("b")
    chat.send("Tell me\\nmore")  # a literal \n: a newline in the turn
    a2, b2 = chat.reply(), chat.reply()
    chat.send("")  # Enter: A
    chat.send(f"/save {foreign}")
    chat.send("/save prefs.jsonl")
    chat.send("/reset")
    chat.send("Hello")
    a3, b3 = chat.reply(), chat.reply()
    chat.send("a")
    chat.send("/save prefs.jsonl")  # its own file: replaced with all three rows
    code, err = chat.finish()
    assert code == 0, err
    assert foreign.read_text() == "not the chat's\n"
    assert "refusing to replace a file this chat did not write" in err
    assert a1 != b1 and a2 != b2
    rows = list(read_comparisons(tmp_path / "prefs.jsonl"))
    assert [(shown(r.chosen), shown(r.rejected)) for r in rows] == [(b1, a1), (a2, b2),
                                                                    (a3, b3)]
    hi, more, hello = (Turn(HUMAN, x) for x in ("Hi there", "Tell me\nmore", "Hello"))
    assert rows[0].prompt == (hi,)
    # the second turn's pair shares the dialogue so far: the first turn with B, picked
    assert rows[1].prompt == (*rows[0].chosen_dialogue.turns, more)
    assert rows[2].prompt == (hello,)  # after /reset
    assert all(not r.flags for r in rows)  # one shared context, two real responses each
    code, out, err = run_cli(["audit", str(tmp_path / "prefs.jsonl")], capsys, monkeypatch)
    assert code == 0 and "3 rows from" in out and "0 of" in out, err


def test_user_mistakes_are_one_line(tiny: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for args in (["chat", "--policy", str(tmp_path / "no-such-model")],
                 ["chat", "--policy", str(tmp_path)],
                 ["chat", "--policy", str(tiny), "--n", "3"],
                 ["chat", "--policy", str(tiny), "--n", "2", "--temperature", "0"],
                 ["chat", str(tiny)], ["chat"]):
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and not out, args
        assert err.startswith("hhrlhf: error: ") and err.count("\n") == 1, err
    # the old spelling, the policy as an argument: the option named
    code, _, err = run_cli(["chat", str(tiny)], capsys, monkeypatch)
    assert f"{tiny} is a model folder: give it as --policy {tiny}" in err, err


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_in_a_terminal_the_two_replies_stand_side_by_side(tiny: Path, tmp_path: Path) -> None:
    """stdin a terminal 100 columns wide: a prompt, A and B in columns, the pick asked;
    Ctrl-C at the prompt ends the chat without a traceback."""
    import fcntl
    import select
    import signal
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([str(HHRLHF), "chat", "--policy", str(tiny), "--n", "2", "--max-new-tokens",
                             "6"], cwd=tmp_path, env={**ENV, "COLUMNS": "100"},
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""

    def until(text: str, times: int = 1) -> None:
        """Read the terminal until ``text`` has been shown ``times`` times in all."""
        nonlocal seen
        while seen.count(text.encode()) < times:
            ready, _, _ = select.select([master], [], [], WAIT)
            assert ready, f"waited for {text!r}; the terminal shows {seen.decode()[-500:]!r}"
            seen += os.read(master, 4096)

    try:
        until("Human: ")
        os.write(master, b"Hello there\r")
        until("continues the conversation? [A/b]")
        os.write(master, b"b\r")
        until("(B continues)")
        # the two replies in one row of columns: "A", padding, the bar, "B"
        assert any(line.startswith("A ") and "| B" in line
                   for line in _plain(seen).splitlines())
        until("Human: ", 2)  # the next turn's prompt (the first is in `seen` already)
        # Ctrl-C at the prompt. Pressed again if need be, as a person would: CPython's
        # readline prints the prompt, then waits in select(), and a SIGINT that lands between
        # the two is only acted on at the next key (on a loaded machine it can land there).
        deadline = time.monotonic() + WAIT
        while True:
            os.kill(proc.pid, signal.SIGINT)
            try:
                assert proc.wait(timeout=10) == 0
                break
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "Ctrl-C did not end the chat"
        while select.select([master], [], [], 0.5)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:  # the terminal's other end closed
                break
        assert b"Traceback" not in seen
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def _plain(raw: bytes) -> str:
    """Terminal output without colours and carriage returns."""
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace")).replace(
        "\r", "")


def test_a_reply_ends_where_the_policy_starts_a_new_turn(tiny: Path) -> None:
    """A real Llama pushed to " Sure" after the prompt, then to the Assistant marker: the reply
    is " Sure" (the sampler stops only at the Human's marker; chat ends it at either), and the
    decode ends there instead of running to --max-new-tokens."""
    from hhrlhf.policy import Policy
    from hhrlhf.policy.conversation import Chat
    from hhrlhf.policy.sample import SampleSettings
    from hhrlhf.records import ASSISTANT, ASSISTANT_MARKER

    policy = Policy.load(tiny)
    tok = policy.tokenizer
    sure = tok(" Sure", add_special_tokens=False)["input_ids"][0]
    marker = tok(ASSISTANT_MARKER, add_special_tokens=False)["input_ids"]
    assert len(marker) == 1
    calls = []

    class Pushed(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, input_ids: torch.Tensor, **kw: object) -> object:
            calls.append(input_ids.shape[1])
            out = self.net(input_ids=input_ids, **kw)
            out.logits[..., sure if input_ids.shape[1] > 1 else marker[0]] += 1e4
            return out

    chat = Chat(Policy(Pushed(policy.net), tok),
                   SampleSettings(max_new_tokens=20, max_prompt_length=64, temperature=0))
    asked = chat.ask("hi")
    pieces = []
    try:
        while True:
            pieces += [text for _, text in next(asked)]
    except StopIteration as end:
        replies = end.value
    assert "".join(pieces) == tok.decode([sure])
    assert replies.turns == [Turn(ASSISTANT, tok.decode([sure]).removeprefix(" "), " ")]
    assert len(calls) == 2  # the prefill, one decode step: then the marker ended the reply
    chat.keep(replies)
    assert chat.dialogue().render() == "\n\nHuman: hi" + ASSISTANT_MARKER + tok.decode([sure])
