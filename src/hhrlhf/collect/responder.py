"""Where responses come from: a :class:`Responder` streams N responses to a dialogue.

Every response comes from an OpenAI-compatible server's ``/v1/completions`` with
``stream=true`` (:class:`EndpointResponder`), read asynchronously, so that a response being
written takes no thread and no CPU of the app's process. What ``--policy`` names:

- a URL: any such server (vLLM, TGI, llama.cpp's server, ``hhrlhf policy serve``);
- a policy folder: the embedded default. :class:`DecodeProcess` starts ``hhrlhf policy serve``
  for it as a child process on a free loopback port, with a random API key, and the responder
  talks to it. The decoding runs outside the app's process: the app's cores and interpreter
  lock stay free for the submits, which must not wait behind a decode.

All of it is in this file so that it is rewired in one place; the child's command line is
built in :func:`policy_serve_command` only.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import ASSISTANT_MARKER, HUMAN_MARKER, Dialogue

HUMAN_STOP = HUMAN_MARKER  # the HH next-turn marker, from records
API_KEY_ENV = "HHRLHF_API_KEY"  # as `hhrlhf policy serve` and hhrlhf.endpoint read it


@dataclass(frozen=True)
class Event:
    """A piece of response ``index``: ``delta`` is text to append; the last event of a
    response has ``done`` set (and ``meta``: how it was sampled, e.g. its seed)."""

    index: int
    delta: str = ""
    done: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyInfo:
    """What the export and the side files say about a policy."""

    name: str
    num_params: str | None  # as the red-team file writes it: "52B", "13B", "2.7B", "85M"
    model_type: str  # "plain lm", "context distillation", "rlhf", "rejection sampling"
    settings: dict[str, Any]


class Responder(Protocol):
    def respond(self, dialogue: Dialogue, n: int) -> AsyncIterator[Event]:
        """Stream ``n`` responses to ``dialogue`` (which ends with the human's turn)."""
        ...

    def describe(self) -> PolicyInfo: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """Sampling settings of `hhrlhf collect serve` (both kinds of policy)."""

    max_new_tokens: int = 128
    max_prompt_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def format_num_params(count: int) -> str:
    """123_456_789 -> "123M", 2_700_000_000 -> "2.7B": the red-team file's notation."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            text = f"{count / size:.3g}"
            if "e" not in text:
                return text + unit
    return f"{max(count, 1) / 1000:.3g}K"


def _strip_space(text: str, first: bool) -> str:
    # A completion starts after "Assistant:" with the space the file format puts there.
    return text[1:] if first and text.startswith(" ") else text


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


class EndpointResponder:
    """Any OpenAI-compatible server: ``POST {url}/v1/completions`` with ``stream=true``,
    read as server-sent events (``data: {...}`` lines, then ``data: [DONE]``).

    ``api_key``: sent as a Bearer token (None: ``$HHRLHF_API_KEY`` if set). ``num_params``:
    None takes the count the server's model card gives (``hhrlhf policy serve`` gives one).
    ``owner``: a :class:`DecodeProcess` this responder ends when it is closed."""

    def __init__(self, url: str, settings: Settings, model_type: str = "plain lm",
                 num_params: str | None = None, model: str | None = None,
                 timeout: float = 300.0, api_key: str | None = None,
                 owner: DecodeProcess | None = None):
        import httpx

        base = url.rstrip("/")
        self.base = base.removesuffix("/v1")
        self.settings = settings
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.owner = owner
        # made once: a client made without one loads the CA bundle again (about 50 ms of CPU
        # with the interpreter lock held, on every response: it held every submit up)
        self._tls = ssl.create_default_context()
        with httpx.Client(base_url=self.base, timeout=timeout, headers=self.headers) as client:
            card = self._card(client, model)
        self.model = str(card["id"])
        counted = card.get("num_params")
        if num_params is None and isinstance(counted, int) and counted > 0:
            num_params = format_num_params(counted)
        self.info = PolicyInfo(self.model, num_params, model_type, asdict(settings))

    def _card(self, client: Any, model: str | None) -> dict[str, Any]:
        import httpx

        try:
            r = client.get("/v1/models")
            r.raise_for_status()
            cards = [c for c in r.json()["data"] if model is None or c["id"] == model]
            return dict(cards[0]) if cards else {"id": model}
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise HHRLHFError(f"{self.base}: not an OpenAI-compatible server (GET /v1/models: "
                              f"{_one_line(e)})") from None

    def describe(self) -> PolicyInfo:
        return self.info

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()

    async def respond(self, dialogue: Dialogue, n: int) -> AsyncIterator[Event]:
        """The ``n`` responses as the server streams them (one connection per call: the app
        may run on several event loops, a pooled connection belongs to one), interleaved;
        each closed by a done event."""
        import httpx

        s = self.settings
        prompt = dialogue.render() + ASSISTANT_MARKER
        seed = secrets.randbelow(2**31)  # a new draw each time; recorded in the side file
        body = {"model": self.model, "prompt": prompt, "n": n, "stream": True, "seed": seed,
                "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "stop": [HUMAN_STOP]}
        started: set[int] = set()
        finished: dict[int, str | None] = {}
        try:
            async with httpx.AsyncClient(base_url=self.base, timeout=self.timeout,
                                         headers=self.headers, verify=self._tls) as client, \
                    client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise HHRLHFError(f"{self.base}/v1/completions answered "
                                      f"{r.status_code}: {r.text[:200]}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # comments, event names, blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    for choice in json.loads(data).get("choices", []):
                        i = int(choice.get("index", 0))
                        text = choice.get("text") or ""
                        if text:
                            yield Event(i, _strip_space(text, i not in started))
                            started.add(i)
                        if choice.get("finish_reason"):
                            finished[i] = choice["finish_reason"]
        except httpx.HTTPError as e:
            raise HHRLHFError(f"{self.base}: {_one_line(e)}") from None
        for i in range(n):
            yield Event(i, done=True, meta={"seed": seed, "stop": finished.get(i)})


def policy_serve_command(folder: Path, port: int, name: str, settings: Settings) -> list[str]:
    """The decode process's command line: ``hhrlhf policy serve`` on loopback (its API key
    goes in the environment, never on the command line). The one place it is spelled."""
    return [sys.executable, "-m", "hhrlhf.cli", "policy", "serve", "--policy", str(folder),
            "--host", "127.0.0.1", "--port", str(port), "--model-name", name,
            "--max-new-tokens", str(settings.max_new_tokens)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Where the app and the decoding share CPU cores, a submit (a few milliseconds of work) goes
# before the next decode step, never waits behind it; on a GPU the decoding hardly needs the
# CPU anyway.
DECODE_NICENESS = 10


class DecodeProcess:
    """``hhrlhf policy serve --policy FOLDER`` as a child of the app (:class:`hhrlhf.child.
    ChildServer`: it dies with the app's process, even by kill -9, on Linux): a free loopback
    port, a random API key, a lower CPU priority; when it fails to start, its last line is the
    error. ``close`` ends it."""

    def __init__(self, folder: str | Path, settings: Settings, start_timeout: float = 600.0):
        import hhrlhf
        from hhrlhf.child import ChildServer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise HHRLHFError("no such policy folder (give a folder or an http(s) URL)",
                              self.folder)
        self.name = self.folder.resolve().name or str(self.folder)
        self.api_key = secrets.token_urlsafe(24)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        # the child imports the hhrlhf this process runs, wherever it was imported from
        src = str(Path(hhrlhf.__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, API_KEY_ENV: self.api_key,
               "PYTHONPATH": src + (os.pathsep + path if path else "")}
        self.child = ChildServer(policy_serve_command(self.folder, port, self.name, settings),
                                 self.url + "/health", "the decode process (hhrlhf policy serve)",
                                 env=env, niceness=DECODE_NICENESS, death_signal=signal.SIGKILL)
        try:
            self.child.start(start_timeout)
        except HHRLHFError as e:
            raise HHRLHFError(str(e), self.folder) from None

    def close(self) -> None:
        self.child.stop()


def make_responder(policy: str, settings: Settings, model_type: str = "plain lm",
                   num_params: str | None = None) -> EndpointResponder:
    """An http(s) URL -> an :class:`EndpointResponder` to it; a folder -> one to a
    :class:`DecodeProcess` started for it (closed with the responder)."""
    if policy.startswith(("http://", "https://")):
        return EndpointResponder(policy, settings, model_type, num_params)
    process = DecodeProcess(policy, settings)
    try:
        return EndpointResponder(process.url, settings, model_type, num_params,
                                 model=process.name, api_key=process.api_key, owner=process)
    except BaseException:
        process.close()
        raise


async def collect_text(events: AsyncIterator[Event],
                       n: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The whole texts and metas of ``n`` streamed responses."""
    texts = [""] * n
    metas: list[dict[str, Any]] = [{} for _ in range(n)]
    async for e in events:
        texts[e.index] += e.delta
        if e.done:
            metas[e.index] = e.meta
    return texts, metas
