"""`hhrlhf policy serve`: the official `openai` client against the real server (uvicorn on
127.0.0.1): completions and chat completions equal the local sampler's, streamed chunks
concatenate to the same text, n, stop strings, the API key, OpenAI-shaped errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from policy_support import (
    ENV,
    first_rows,
    one_thread,  # noqa: F401  # autouse
    varied_policy,
)
from serve_support import MODEL, served

from hhrlhf.policy import Policy
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.policy.model import ASSISTANT_MARKER, HUMAN_MARKER
from hhrlhf.policy.sample import Sampler
from hhrlhf.records import Dialogue


@pytest.fixture(scope="module")
def policy(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return varied_policy(real_file, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def url(policy: Policy) -> Iterator[str]:
    with served(policy) as base:
        yield base


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def _prompts(real_file: Path, k: int) -> list[Dialogue]:
    return [c.chosen_dialogue for c in first_rows(real_file, k)]


def _local(policy: Policy, dialogues: list[Dialogue], n: int, max_tokens: int, seed: int,
           **kw: float) -> list[tuple[str, str]]:
    """What `hhrlhf generate` samples: (text, OpenAI finish_reason) per sample."""
    keep = min(512, policy.config.max_position_embeddings - max_tokens)
    ids, _ = PolicyEncoder(policy.tokenizer, keep + max_tokens).encode_prompts(dialogues, keep)
    samples = Sampler(policy.net, policy.tokenizer).sample(ids, n=n, max_new_tokens=max_tokens,
                                                           seed=seed, **kw)
    return [(s.text, "length" if s.stop == "length" else "stop") for s in samples]


def _prompt(d: Dialogue) -> str:
    return Dialogue(d.turns[:-1], d.preamble).render() + ASSISTANT_MARKER


def test_completions_equal_the_local_sampler_and_stream_the_same_text(
        policy: Policy, url: str, real_file: Path) -> None:
    dialogues = _prompts(real_file, 3)
    client = _client(url)
    got = client.completions.create(model=MODEL, prompt=[_prompt(d) for d in dialogues], n=2,
                                    max_tokens=24, seed=4, temperature=1.0)
    assert [c.index for c in got.choices] == list(range(6))
    texts = [(c.text, c.finish_reason) for c in got.choices]
    assert texts == _local(policy, dialogues, 2, 24, 4)
    assert {f for _, f in texts} == {"stop", "length"}
    assert got.model == MODEL and got.usage is not None and got.usage.completion_tokens > 6
    # streamed: chunks arrive per step, concatenate to the same texts and finish reasons
    chunks = list(client.completions.create(model=MODEL, prompt=[_prompt(d) for d in dialogues],
                                            n=2, max_tokens=24, seed=4, stream=True))
    assert len(chunks) > 12
    streamed = {j: "" for j in range(6)}
    finish: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            assert c.index not in finish  # nothing after a choice's finish
            streamed[c.index] += c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert [(streamed[j], finish[j]) for j in range(6)] == texts
    # greedy: the same text whatever the seed
    a = client.completions.create(model=MODEL, prompt=_prompt(dialogues[0]), temperature=0,
                                  max_tokens=10, seed=1)
    b = client.completions.create(model=MODEL, prompt=_prompt(dialogues[0]), temperature=0,
                                  max_tokens=10, seed=2)
    assert a.choices[0].text == b.choices[0].text


def test_a_policy_whose_cache_cannot_be_batched_streams_taking_turns(
        policy: Policy, real_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the KV cache is not plain layers (supports() says no), streams take turns, one
    decode step each: a stream gives the local sampler's texts, and a stream's decode steps
    and another's never share a forward pass."""
    import hhrlhf.policy.batching

    monkeypatch.setattr(hhrlhf.policy.batching, "supports", lambda sampler: False)
    dialogues = _prompts(real_file, 2)
    long_body = {"model": MODEL, "prompt": "\n\nHuman: hi" + ASSISTANT_MARKER,
                 "max_tokens": 400, "stream": True, "temperature": 1.0, "seed": 1}
    with served(policy) as base, endless(policy) as passes:
        expected = _local(policy, dialogues, 2, 16, 6)  # under the same bar on EOS
        passes.clear()
        with httpx.stream("POST", base + "/completions", json=long_body, timeout=120) as slow:
            unread = slow.iter_lines()
            assert next(unread).startswith("data: {")  # then it reads no more
            chunks = list(_client(base).completions.create(
                model=MODEL, prompt=[_prompt(d) for d in dialogues], n=2, max_tokens=16,
                seed=6, stream=True))
    streamed = {j: "" for j in range(4)}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] += c.text
    assert [streamed[j] for j in range(4)] == [text for text, _ in expected]
    # the stalled stream's steps (1 row) and the request's (4 rows), never one pass of 5
    assert {1, 4} <= set(passes) and 5 not in passes


def test_chat_completions_render_the_hh_format(policy: Policy, url: str) -> None:
    client = _client(url)
    messages = [{"role": "user", "content": "How do I bake bread?"},
                {"role": "assistant", "content": "With flour."},
                {"role": "user", "content": "And then?"}]
    got = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                         n=2, max_tokens=20, seed=9)
    d = Dialogue.parse("\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: "
                       "And then?")
    local = _local(policy, [d], 2, 20, 9)
    # the space after "Assistant:" separates the turn: not part of the reply
    assert [(c.message.content, c.finish_reason) for c in got.choices] == [
        (t.removeprefix(" "), f) for t, f in local]
    assert got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                            n=2, max_tokens=20, seed=9, stream=True,
                                            stream_options={"include_usage": True})
    texts = ["", ""]
    roles = []
    usage = None
    for ch in stream:
        usage = ch.usage or usage
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.append(c.index)
    assert texts == [c.message.content for c in got.choices]
    assert sorted(roles) == [0, 1] and usage is not None and usage.completion_tokens > 2
    # a system message first is the text before the first turn
    sys_msgs = [{"role": "system", "content": "Be kind."}, *messages]
    got = client.chat.completions.create(model=MODEL, messages=sys_msgs,  # type: ignore
                                         max_tokens=8, temperature=0)
    local = _local(policy, [Dialogue(d.turns, "Be kind.")], 1, 8, 0, temperature=0)
    assert got.choices[0].message.content == local[0][0].removeprefix(" ")


def test_stop_strings_cut_the_text(url: str, real_file: Path) -> None:
    client = _client(url)
    prompt = _prompt(_prompts(real_file, 1)[0])
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, seed=5)
    text = free.choices[0].text
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    stop = word[:2]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, seed=5,
                                    stop=[stop, HUMAN_MARKER])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, seed=5,
                                         stop=[stop], stream=True)
    pieces = [(c.text, c.finish_reason) for ch in streamed for c in ch.choices]
    assert "".join(p for p, _ in pieces) == cut.choices[0].text
    assert pieces[-1][1] == "stop"


def test_models_auth_and_errors(policy: Policy, url: str) -> None:
    client = _client(url)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    prompt = "\n\nHuman: hi" + ASSISTANT_MARKER
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=2)
    assert e.value.status_code == 404 and "tiny-hh" in e.value.message
    assert e.value.code == "model_not_found"
    for bad in ({"temperature": 5}, {"n": 0}, {"top_p": 0}, {"logprobs": 2},
                {"max_tokens": 100_000}, {"seed": 2**70}, {"stop": [""]}, {"n": 5000}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=prompt, **bad)  # type: ignore
        assert err.value.status_code == 400
        assert isinstance(err.value.body, dict) and err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="must be an HH dialogue ending"):
        client.completions.create(model=MODEL, prompt="\n\nHuman: hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(openai.BadRequestError, match="only text content"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    # not JSON, no route: OpenAI-shaped JSON errors, no traceback
    r = httpx.post(url + "/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type"}
    for path in (url + "/nowhere", url.removesuffix("/v1") + "/docs"):
        r = httpx.get(path)
        assert r.status_code == 404 and "error" in r.json()
    # a key required: none or a wrong one is 401, the right one works
    with served(policy, api_key="s3cret") as keyed:
        with pytest.raises(openai.AuthenticationError) as auth:
            _client(keyed, "wrong").models.list()
        assert auth.value.status_code == 401
        assert httpx.get(keyed + "/models").status_code == 401
        ok = _client(keyed, "s3cret").completions.create(model=MODEL, prompt=prompt,
                                                         max_tokens=3)
        assert len(ok.choices) == 1


def test_the_command_serves_with_a_key_from_the_environment(policy: Policy,
                                                            real_file: Path,
                                                            tmp_path: Path) -> None:
    from web_support import free_port, wait_until_up

    folder = tmp_path / "policy"
    policy.save(folder)
    port = free_port()
    env = {**ENV, "HHRLHF_API_KEY": "k-123"}
    exe = [sys.executable, "-m", "hhrlhf.cli"]
    proc = subprocess.Popen([*exe, "policy", "serve", "--policy", str(folder), "--port", str(port),
                             "--model-name", "hh"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health")
        got = _client(f"http://127.0.0.1:{port}/v1", "k-123").completions.create(
            model="hh", prompt="\n\nHuman: hi\n\nAssistant:", max_tokens=4, temperature=0)
        assert got.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        # the port is taken now: one line, exit 2
        busy = subprocess.run([*exe, "policy", "serve", "--policy", str(folder), "--port", str(port)],
                              env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        assert busy.returncode == 2
        assert busy.stderr.strip().splitlines() == [
            (f"hhrlhf: error: cannot listen on 127.0.0.1:{port}: the port is in use; pick "
             "another with --port")]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"as model 'hh' at http://127.0.0.1:{port}/v1 (API key required" in out
    assert "k-123" not in out  # a key given is not printed


@contextmanager
def endless(policy: Policy) -> Iterator[list[int]]:
    """While it lasts, no sample of ``policy`` can end before its max_tokens (neither EOS nor
    the Human marker, one token here, can be drawn), and every forward pass is counted (the
    list's length; each entry is the pass's rows)."""
    passes: list[int] = []
    count = policy.net.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: passes.append(int(args[0].shape[0])))
    ends = torch.tensor([policy.eos_id, *policy.tokenizer(
        HUMAN_MARKER, add_special_tokens=False)["input_ids"]])
    no_eos = policy.net.lm_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, ends, -1e9))
    try:
        yield passes
    finally:
        count.remove()
        no_eos.remove()


def test_a_client_gone_mid_stream_frees_the_server(policy: Policy, url: str) -> None:
    """The decode of a stream whose client left stops (far fewer forward passes than its
    max_tokens), and the next request is answered."""
    prompt = "\n\nHuman: hi" + ASSISTANT_MARKER
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "stream": True,
            "temperature": 1.0, "seed": 1}
    with endless(policy) as passes:
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert next(r.iter_lines()).startswith("data: {")
        got = _client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=3, seed=1)
    assert len(got.choices) == 1 and got.choices[0].finish_reason == "length"
    assert len(passes) < 200


def test_streams_in_flight_share_each_decode_step(policy: Policy, url: str) -> None:
    """Streams in flight are decoded together (a forward pass holds the rows of both), and
    a stream whose client stops reading (it stays connected) holds no other stream up: a
    short stream started after a long one ends long before the long one's decode could have
    (counted in forward passes)."""
    prompt = "\n\nHuman: hi" + ASSISTANT_MARKER
    long_body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "stream": True,
                 "temperature": 1.0, "seed": 1}
    short_body = {**long_body, "max_tokens": 3, "seed": 2}
    with endless(policy) as passes, \
            httpx.stream("POST", url + "/completions", json=long_body, timeout=120) as slow:
        # kept: a line iterator dropped half-read closes the connection (the client gone)
        unread = slow.iter_lines()
        assert next(unread).startswith("data: {")  # then it reads no more
        with httpx.stream("POST", url + "/completions", json=short_body, timeout=120) as quick:
            lines = [x for x in quick.iter_lines() if x.startswith("data:")]
        at_short_end = len(passes)
        assert not slow.is_closed
    assert lines[-1] == "data: [DONE]"
    assert at_short_end < 200  # the long stream (400 steps) was still being decoded
    assert 2 in passes[:at_short_end]  # a decode step of the long and the short stream
