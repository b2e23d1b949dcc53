"""The endpoint client (hhrlhf.endpoint) against `policy serve` (the protocol vLLM speaks):
the same samples as the local sampler, streaming, `generate URL` and `bon URL`; one-line errors
and retries against real misbehaving HTTP servers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from policy_support import (
    first_rows,
    one_thread,  # noqa: F401  # autouse
    run_cli,
    varied_policy,
)
from serve_support import MODEL, served
from web_support import free_port

from hhrlhf.endpoint import EndpointSampler, base_url, is_endpoint, prompt_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.policy import Policy
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.policy.sample import Sampler
from hhrlhf.records import Dialogue


@pytest.fixture(scope="module")
def tiny(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Policy, Path]:
    folder = tmp_path_factory.mktemp("endpoint") / "tiny"
    return varied_policy(real_file, folder), folder


@pytest.fixture(scope="module")
def url(tiny: tuple[Policy, Path]) -> Iterator[str]:
    with served(tiny[0]) as base:
        yield base


def test_urls_and_prompts() -> None:
    assert is_endpoint("http://127.0.0.1:8000/v1") and not is_endpoint("runs/sft/model")
    assert base_url("http://h:8000") == "http://h:8000/v1"
    assert base_url("https://h/api/v1/") == "https://h/api/v1"
    with pytest.raises(HHRLHFError, match="not an http"):
        base_url("http://")
    d = Dialogue.parse("\n\nHuman: hi\n\nAssistant: hello")
    assert prompt_text(d) == "\n\nHuman: hi\n\nAssistant:"


def test_the_client_samples_what_the_local_sampler_samples(tiny: tuple[Policy, Path], url: str,
                                                           real_file: Path) -> None:
    policy = tiny[0]
    dialogues = [c.chosen_dialogue for c in first_rows(real_file, 3)]
    client = EndpointSampler(url)
    assert client.model == MODEL  # the one model the server lists
    got = client.sample(dialogues, n=2, max_new_tokens=20, seed=6, max_prompt_length=200)
    ids, _ = PolicyEncoder(policy.tokenizer, 220).encode_prompts(dialogues, 200)
    local = Sampler(policy.net, policy.tokenizer).sample(ids, n=2, max_new_tokens=20, seed=6)
    assert [(c.prompt_index, c.sample_index, c.text, c.stop) for c in got] == [
        (s.prompt_index, s.sample_index, s.text, s.stop) for s in local]
    assert {c.stop for c in got} >= {"eos", "length"}
    # streamed: the same texts and stops
    texts: dict[tuple[int, int], str] = {}
    stops: dict[tuple[int, int], str] = {}
    for delta in client.stream(dialogues, n=2, max_new_tokens=20, seed=6,
                               max_prompt_length=200):
        key = (delta.prompt_index, delta.sample_index)
        assert key not in stops
        texts[key] = texts.get(key, "") + delta.text
        if delta.stop is not None:
            stops[key] = delta.stop
    assert [(texts[k], stops[k]) for k in sorted(texts)] == [(c.text, c.stop) for c in got]


def test_generate_and_bon_take_an_endpoint_url(tiny: tuple[Policy, Path], url: str,
                                               real_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    args = [str(real_file), "--n", "2", "--max-prompts", "3", "--max-new-tokens", "12",
            "--seed", "1"]
    code, remote, err = run_cli(["generate", "--policy", url, *args], capsys, monkeypatch)
    assert code == 0, err
    code, local, err = run_cli(["generate", "--policy", str(tiny[1]), *args], capsys,
                               monkeypatch)
    assert code == 0, err
    rows = [json.loads(x) for x in remote.splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"id", "prompt_id", "sample", "text", "response",
                                                "stop"}
    assert rows == [json.loads(x) for x in local.splitlines()]  # generate's rows, exactly
    # bon: its table, from the endpoint's samples
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    pm = tmp_path / "pm"
    LexicalPreferenceModel.fit(first_rows(real_file, 200)).save(pm)
    bon = ["--pm", str(pm), str(real_file), "--n", "4", "--max-prompts", "3", "--max-new-tokens", "10",
           "--max-prompt-length", "200", "-q"]
    code, out, err = run_cli(["bon", "--policy", url, *bon], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("best-of-4: 3 prompts x 4 samples")
    assert "n   KL (nats)   PM reward of best-of-n" in out
    code, as_json, err = run_cli(["bon", "--policy", url, *bon, "--json"], capsys, monkeypatch)
    code2, local_json, err2 = run_cli(["bon", "--policy", str(tiny[1]), *bon, "--json"], capsys,
                                      monkeypatch)
    assert code == code2 == 0, err + err2
    assert json.loads(as_json)["curve"] == json.loads(local_json)["curve"]
    # a wrong model name: one line, naming the fix
    code, _, err = run_cli(["generate", "--policy", url, *args, "--endpoint-model", "nope"],
                           capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert "answered 404" in err and "--endpoint-model" in err


# ---- failures, against real servers that misbehave ------------------------------------------
@contextmanager
def misbehaving(replies: list[tuple[int, Any, float]]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 answering each request with the next (status, JSON body,
    delay in seconds) of ``replies`` (the last one repeated); yields (base URL, paths asked)."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            asked.append(self.path)
            status, body, delay = replies[min(len(asked), len(replies)) - 1]
            time.sleep(delay)
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (a timeout test)
                pass

        def do_GET(self) -> None:
            self._reply()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self._reply()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", asked
    finally:
        server.shutdown()
        server.server_close()


OK = {"choices": [{"index": 0, "text": " Fine.", "finish_reason": "stop"},
                  {"index": 1, "text": " Sure\n\nHuman: and", "finish_reason": "length"}]}
PROMPT = [Dialogue.parse("\n\nHuman: hi")]


def test_transient_failures_are_retried_then_succeed() -> None:
    with misbehaving([(503, {"error": {"message": "busy"}}, 0),
                      (500, {"error": "oops"}, 0), (200, OK, 0)]) as (base, asked):
        got = EndpointSampler(base, model="m", retries=3, backoff=0.01).sample(PROMPT, n=2)
    assert len(asked) == 3
    # a server that ignored the stop string: the marker is cut here
    assert [(c.text, c.stop) for c in got] == [(" Fine.", "eos"), (" Sure", "human")]


def test_failures_are_one_line_errors() -> None:
    # nothing listening
    refused = EndpointSampler(f"http://127.0.0.1:{free_port()}/v1", model="m", retries=1,
                              backoff=0.01)
    with pytest.raises(HHRLHFError, match=r"cannot connect to .*: connection refused \(is the "
                                          r"server running\?\) \(after 2 tries\)"):
        refused.sample(PROMPT)
    # a 5xx that stays: retried, then the server's message
    with misbehaving([(503, {"error": {"message": "overloaded"}}, 0)]) as (base, asked), \
            pytest.raises(HHRLHFError, match="answered 503 after 3 tries: overloaded"):
        EndpointSampler(base, model="m", retries=2, backoff=0.01).sample(PROMPT)
    assert len(asked) == 3
    # a 4xx: not retried; 401 names the key options
    with misbehaving([(401, {"error": {"message": "bad key"}}, 0)]) as (base, asked), \
            pytest.raises(HHRLHFError, match=r"answered 401: bad key \(give --api-key"):
        EndpointSampler(base, model="m", retries=3, backoff=0.01).sample(PROMPT)
    assert len(asked) == 1
    # too slow: not retried (the same request would take as long again)
    with misbehaving([(200, OK, 3)]) as (base, asked), \
            pytest.raises(HHRLHFError, match=r"did not answer within 0.5 s \(--endpoint-tim"):
        EndpointSampler(base, model="m", timeout=0.5, retries=3).sample(PROMPT, n=2)
    assert len(asked) == 1
    # not the protocol
    with misbehaving([(200, {"choices": "x"}, 0)]) as (base, _), \
            pytest.raises(HHRLHFError, match="answered 0 choices for 1 prompts x 1"):
        EndpointSampler(base, model="m").sample(PROMPT)
    # several models and none named
    with misbehaving([(200, {"data": [{"id": "a"}, {"id": "b"}]}, 0)]) as (base, _), \
            pytest.raises(HHRLHFError, match=r"lists 2 models \(a, b\); name one with "
                                             "--endpoint-model"):
        EndpointSampler(base).model  # noqa: B018


def test_rl_eval_samples_the_initial_policy_from_an_endpoint(
        tiny: tuple[Policy, Path], url: str, tmp_path: Path, real_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose final policy is its initial one, the initial one served: the same seed
    gives the same responses locally and from the endpoint, so every prompt is a tie."""
    from test_rl_eval import make_run
    from test_rl_eval import run_cli as rl_eval

    from hhrlhf.pm.lexical import LexicalPreferenceModel

    LexicalPreferenceModel.fit(first_rows(real_file, 200)).save(tmp_path / "pm")
    parts = {"initial": tiny[1], "pm": tmp_path / "pm", "real_file": real_file}
    run = make_run(tmp_path / "run", parts, final="initial")
    code, out, err = rl_eval([str(run), "--initial", url, "--prompts", str(real_file),
                              "--max-prompts", "5", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["initial_policy"] == url
    p = doc["win_rate"]["pms"][0]
    assert p["prompts"] == 5 and p["ties"] == 5 and p["win_rate"] == 0.5


def test_generate_from_an_endpoint_needs_no_extras(url: str, real_file: Path,
                                                   tmp_path: Path) -> None:
    """`generate URL` works on the core install (torch, transformers, FastAPI... not
    importable, as in test_extras); `policy serve` names the extra it needs."""
    import os
    import subprocess
    import sys

    from policy_support import ENV
    from test_extras import BLOCKED, BLOCKER

    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**ENV, "HHRLHF_TEST_BLOCK": ",".join(BLOCKED),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "hhrlhf.cli"]
    r = subprocess.run([*cli, "generate", "--policy", url, str(real_file), "--max-prompts", "2",
                        "--max-new-tokens", "4"], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["sample"] for x in r.stdout.splitlines()] == [0, 0]
    r = subprocess.run([*cli, "policy", "serve", "--policy", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 2
    assert r.stderr == ("hhrlhf: error: hhrlhf policy serve needs the 'pm' extra: "
                        "pip install 'hhrlhf[pm]'\n")
