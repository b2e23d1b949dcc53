"""Where responses come from: a :class:`Responder` streams N responses to a dialogue.

Two kinds, chosen by what ``--policy`` names: a policy folder runs in this process
(:class:`LocalResponder`, over :class:`~hhrlhf.policy.sample.Sampler`), a URL is any
OpenAI-compatible server's ``/v1/completions`` with ``stream=true`` (:class:`EndpointResponder`;
``hhrlhf policy serve`` is one). All of it is in this file so that it is rewired in one place.

The local one gives each response as one chunk for now (the sampler decodes a batch to the
end); an endpoint's text arrives token by token as the server sends it.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import ASSISTANT_MARKER, HUMAN_MARKER, Dialogue

HUMAN_STOP = HUMAN_MARKER  # the HH next-turn marker, from records


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
    def respond(self, dialogue: Dialogue, n: int) -> Iterator[Event]:
        """Stream ``n`` responses to ``dialogue`` (which ends with the human's turn)."""
        ...

    def describe(self) -> PolicyInfo: ...


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


class LocalResponder:
    """A policy folder, sampled in this process. One generation at a time (a lock): the
    torch threads are shared, and two decodes at once would only slow each other down."""

    def __init__(self, folder: str | Path, settings: Settings, model_type: str = "plain lm",
                 num_params: str | None = None):
        from hhrlhf.policy.encode import PolicyEncoder
        from hhrlhf.policy.model import Policy
        from hhrlhf.policy.sample import Sampler

        self.folder = Path(folder)
        self.policy = Policy.load(folder)
        positions = getattr(self.policy.config, "max_position_embeddings", None) or 1 << 30
        if settings.max_prompt_length + settings.max_new_tokens > positions:
            # as `hhrlhf generate`: the prompt gets what the responses leave of the positions
            settings = replace(settings, max_prompt_length=positions - settings.max_new_tokens)
            if settings.max_prompt_length < 4:
                raise HHRLHFError(f"--max-new-tokens {settings.max_new_tokens} leaves no room "
                                  f"for a prompt in the policy's {positions} positions")
        self.settings = settings
        self.policy.check_length(settings.max_prompt_length + settings.max_new_tokens,
                                 "--max-prompt-length + --max-new-tokens")
        self.encoder = PolicyEncoder(self.policy.tokenizer,
                                     settings.max_prompt_length + settings.max_new_tokens)
        self.sampler = Sampler(self.policy.net, self.policy.tokenizer)
        count = sum(p.numel() for p in self.policy.net.parameters())
        self.info = PolicyInfo(self.folder.name or str(self.folder),
                               num_params or format_num_params(count), model_type,
                               asdict(settings))
        self._lock = threading.Lock()

    def describe(self) -> PolicyInfo:
        return self.info

    def respond(self, dialogue: Dialogue, n: int) -> Iterator[Event]:
        """The ``n`` responses token by token as the sampler decodes them (whole characters;
        the HH marker held back and cut), interleaved; each closed by a done event."""
        from hhrlhf.policy.textstream import stream_text

        s = self.settings
        seed = secrets.randbelow(2**31)  # a new draw each time; recorded in the side file
        prompts, _ = self.encoder.encode_prompts([dialogue], s.max_prompt_length)
        started: set[int] = set()  # samples whose text has begun (its leading space dropped)
        deltas = stream_text(self.sampler, prompts, n=n, max_new_tokens=s.max_new_tokens,
                             temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                             seed=seed, batch_size=max(n, 1))
        while True:
            # the lock is held for one decode step at a time, never across a yield: a client
            # that reads slowly, or goes away without closing its stream, holds nothing up;
            # other streams' steps interleave (each decode's state is its own)
            with self._lock:
                d = next(deltas, None)
            if d is None:
                return
            text = d.text if d.sample_index in started else _strip_space(d.text, True)
            if text:
                started.add(d.sample_index)
                yield Event(d.sample_index, text)
            if d.stop is not None:
                yield Event(d.sample_index, done=True, meta={"seed": seed, "stop": d.stop})


class EndpointResponder:
    """Any OpenAI-compatible server: ``POST {url}/v1/completions`` with ``stream=true``,
    read as server-sent events (``data: {...}`` lines, then ``data: [DONE]``)."""

    def __init__(self, url: str, settings: Settings, model_type: str = "plain lm",
                 num_params: str | None = None, model: str | None = None,
                 timeout: float = 300.0):
        import httpx

        base = url.rstrip("/")
        self.base = base.removesuffix("/v1")
        self.settings = settings
        self.client = httpx.Client(base_url=self.base, timeout=timeout)
        self.model = model or self._first_model()
        self.info = PolicyInfo(self.model, num_params, model_type, asdict(settings))

    def _first_model(self) -> str:
        import httpx

        try:
            r = self.client.get("/v1/models")
            r.raise_for_status()
            return str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise HHRLHFError(f"{self.base}: not an OpenAI-compatible server (GET /v1/models: "
                              f"{' '.join(str(e).split())[:200]})") from None

    def describe(self) -> PolicyInfo:
        return self.info

    def respond(self, dialogue: Dialogue, n: int) -> Iterator[Event]:
        import httpx

        s = self.settings
        prompt = dialogue.render() + ASSISTANT_MARKER
        body = {"model": self.model, "prompt": prompt, "n": n, "stream": True,
                "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "stop": [HUMAN_STOP]}
        started: set[int] = set()
        finished: dict[int, str | None] = {}
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise HHRLHFError(f"{self.base}/v1/completions answered {r.status_code}: "
                                      f"{r.text[:200]}")
                for line in r.iter_lines():
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
            raise HHRLHFError(f"{self.base}: {' '.join(str(e).split())[:200]}") from None
        for i in range(n):
            yield Event(i, done=True, meta={"stop": finished.get(i)})


def make_responder(policy: str, settings: Settings, model_type: str = "plain lm",
                   num_params: str | None = None) -> Responder:
    """A folder -> :class:`LocalResponder`; an http(s) URL -> :class:`EndpointResponder`."""
    if policy.startswith(("http://", "https://")):
        return EndpointResponder(policy, settings, model_type, num_params)
    return LocalResponder(policy, settings, model_type, num_params)


def collect_text(events: Iterator[Event], n: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The whole texts and metas of ``n`` streamed responses."""
    texts = [""] * n
    metas: list[dict[str, Any]] = [{} for _ in range(n)]
    for e in events:
        texts[e.index] += e.delta
        if e.done:
            metas[e.index] = e.meta
    return texts, metas
