"""Sampling from any OpenAI-compatible completions endpoint: ``hhrlhf policy serve``, vLLM, TGI,
llama.cpp's server all answer ``POST /v1/completions``.

:class:`EndpointSampler` sends HH prompts (a dialogue's text, then ``"\\n\\nAssistant:"``) with
``stop: ["\\n\\nHuman:"]``, so any server ends a response where the policy starts the human's
next turn, as the local sampler does; the prompts of one call go in one request (a list of
prompts), so against ``hhrlhf policy serve`` a call gives what the local :class:`Sampler` gives
for the same seed. Only ``requests`` is needed: no torch, no ``openai`` package.

Failures are one line (:class:`HHRLHFError`): connection refused, an unknown host, a timeout,
an answer that is not the protocol's, and the server's own message for a 4xx or 5xx. A
connection error (a connect timeout included), 408, 429 and 5xx are retried (``retries``
times, waiting ``backoff`` seconds, doubling; a ``Retry-After`` of a few seconds is honoured);
other 4xx are not (the request itself is wrong), nor is a server that connected but did not
answer within ``timeout`` (the same request would take as long again).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import ASSISTANT, ASSISTANT_MARKER, HUMAN_MARKER, Dialogue

API_KEY_ENV = "HHRLHF_API_KEY"
TRANSIENT = {408, 429, 500, 502, 503, 504}
MAX_CHOICES = 4096  # prompts x n per request (hhrlhf policy serve's limit)


def is_endpoint(policy: str) -> bool:
    """Whether a POLICY argument names an endpoint (an http:// or https:// URL)."""
    return policy.startswith(("http://", "https://"))


def base_url(url: str) -> str:
    """The API base: ``http://host:port`` gets ``/v1`` (as vLLM and ``policy serve`` mount
    it); a URL with a path is taken as the base (``.../v1``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HHRLHFError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


def prompt_text(d: Dialogue) -> str:
    """The completions prompt of a dialogue: its turns (a final Assistant turn dropped, it is
    what is sampled) and the Assistant marker."""
    turns = d.turns[:-1] if d.turns and d.turns[-1].role == ASSISTANT else d.turns
    return Dialogue(turns, d.preamble).render() + ASSISTANT_MARKER


@dataclass
class Completion:
    """One sampled response, as :class:`hhrlhf.policy.sample.Sample` has it (without tokens)."""

    prompt_index: int
    sample_index: int
    text: str  # the response text, the leading space kept, the stop marker cut
    stop: str  # "eos" (or any stop the server does not name), "human" or "length"


@dataclass(frozen=True)
class Delta:
    """Streamed text of one sample; ``stop`` set on its last delta."""

    prompt_index: int
    sample_index: int
    text: str
    stop: str | None


def _stop(choice: dict[str, Any]) -> str | None:
    finish = choice.get("finish_reason")
    if finish is None:
        return None
    if finish == "length":
        return "length"
    return "human" if choice.get("stop_reason") == HUMAN_MARKER else "eos"


class EndpointSampler:
    """Samples N responses to HH prompts from the completions endpoint at ``url``.

    ``model``: the model name to ask for; None: the one the server lists (``GET /models``; an
    error if it lists several). ``api_key``: sent as a Bearer token; None: ``$HHRLHF_API_KEY``
    if set. ``timeout``: seconds to wait for the server (to connect, and between bytes)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 4, backoff: float = 0.5):
        self.url = base_url(url)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.api_key = key or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = requests.Session()
        self._model = model

    # -- HTTP ----------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 stream: bool = False) -> requests.Response:
        """The response (2xx), after retrying transient failures; one-line errors."""
        url = self.url + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            wait = self.backoff * 2 ** attempt
            try:
                r = self.session.request(method, url, json=body, headers=self._headers(),
                                         timeout=self.timeout, stream=stream)
            except requests.ConnectionError as e:
                if last:
                    raise HHRLHFError(f"cannot connect to {self.url}: {_reason(e)}"
                                      + (f" (after {attempt + 1} tries)" if attempt else ""))\
                        from None
            except requests.Timeout:
                # connected, then no answer in time: not retried, as a sampling request that
                # took too long would only take as long again
                raise HHRLHFError(f"{self.url} did not answer within {self.timeout:g} s "
                                  "(--endpoint-timeout)") from None
            except requests.RequestException as e:
                raise HHRLHFError(f"cannot reach {self.url}: {_reason(e)}") from None
            else:
                if r.status_code < 400:
                    return r
                if r.status_code not in TRANSIENT or last:
                    raise HHRLHFError(self._refusal(r, attempt))
                after = r.headers.get("retry-after", "")
                if after.isdigit() and int(after) <= 30:
                    wait = max(wait, float(after))
                r.close()
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _refusal(self, r: requests.Response, attempt: int) -> str:
        try:
            err = r.json().get("error")
            message = err.get("message") if isinstance(err, dict) else err or r.json()
        except (ValueError, AttributeError):
            message = r.text
        message = " ".join(str(message).split())[:300] or r.reason
        hint = ""
        if r.status_code == 401:
            hint = f" (give --api-key, or set ${API_KEY_ENV})"
        elif r.status_code == 404 and "model" in message:
            hint = " (name the server's model with --endpoint-model)"
        tries = f" after {attempt + 1} tries" if attempt else ""
        return f"{self.url} answered {r.status_code}{tries}: {message}{hint}"

    def _json(self, r: requests.Response) -> dict[str, Any]:
        try:
            data = r.json()
        except ValueError:
            raise HHRLHFError(f"{self.url} did not answer JSON: {r.text[:100]!r}") from None
        if not isinstance(data, dict):
            raise HHRLHFError(f"{self.url} did not answer a JSON object")
        return data

    @property
    def model(self) -> str:
        """The model name sent with each request."""
        if self._model is None:
            data = self._json(self._request("GET", "/models")).get("data")
            ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) \
                else []
            if len(ids) != 1 or not isinstance(ids[0], str):
                raise HHRLHFError(f"{self.url} lists {len(ids)} models"
                                  + (f" ({', '.join(map(str, ids[:5]))})" if ids else "")
                                  + "; name one with --endpoint-model")
            self._model = ids[0]
        return self._model

    # -- sampling ------------------------------------------------------------------------------
    def _body(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, seed: int, max_prompt_length: int | None,
              stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "prompt": prompts, "n": n, "max_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed, "stop": [HUMAN_MARKER],
            "stream": stream}
        if top_k > 0:
            body["top_k"] = top_k  # vLLM's extension (and policy serve's)
        if max_prompt_length:
            body["truncate_prompt_tokens"] = max_prompt_length  # keep the end (vLLM's too)
        return body

    def sample(self, dialogues: Sequence[Dialogue], n: int = 1, max_new_tokens: int = 128,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               max_prompt_length: int | None = None) -> list[Completion]:
        """``n`` responses per dialogue, ordered as :meth:`Sampler.sample`'s: sample k of
        prompt i at ``i * n + k``."""
        per = max(1, MAX_CHOICES // n)
        out: list[Completion] = []
        for part, at in enumerate(range(0, len(dialogues), per)):
            group = [prompt_text(d) for d in dialogues[at: at + per]]
            r = self._request("POST", "/completions", self._body(
                group, n, max_new_tokens, temperature, top_p, top_k, seed + part,
                max_prompt_length, stream=False))
            choices = self._json(r).get("choices")
            if not isinstance(choices, list) or len(choices) != len(group) * n:
                got = len(choices) if isinstance(choices, list) else 0
                raise HHRLHFError(f"{self.url} answered {got} choices for "
                                  f"{len(group)} prompts x {n}")
            for j, c in enumerate(sorted(choices, key=lambda c: int(c.get("index", 0)))):
                text, cut = _cut(str(c.get("text") or ""))
                out.append(Completion(at + j // n, j % n, text,
                                      "human" if cut else _stop(c) or "eos"))
        return out

    def stream(self, dialogues: Sequence[Dialogue], n: int = 1, max_new_tokens: int = 128,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               max_prompt_length: int | None = None) -> Iterator[Delta]:
        """The same responses as :meth:`sample` (one request), as text deltas while the server
        produces them (server-sent events)."""
        if len(dialogues) * n > MAX_CHOICES:
            raise HHRLHFError(f"at most {MAX_CHOICES} prompts x n per stream")
        r = self._request("POST", "/completions", self._body(
            [prompt_text(d) for d in dialogues], n, max_new_tokens, temperature, top_p, top_k,
            seed, max_prompt_length, stream=True), stream=True)
        seen = [""] * (len(dialogues) * n)  # each sample's text so far
        done = [False] * len(seen)
        with r:
            for data in _events(r, self.url):
                for c in data.get("choices") or []:
                    j = int(c.get("index", 0))
                    if not 0 <= j < len(seen) or done[j]:
                        continue
                    stop = _stop(c)
                    whole, cut = _cut(seen[j] + str(c.get("text") or ""))
                    if cut:
                        stop = "human"
                    delta, seen[j] = whole[len(seen[j]):], whole
                    done[j] = stop is not None
                    if delta or stop is not None:
                        yield Delta(j // n, j % n, delta, stop)


def _cut(text: str) -> tuple[str, bool]:
    """The text cut at the HH next-turn marker, for a server that ignored ``stop`` (and
    whether it was cut)."""
    at = text.find(HUMAN_MARKER)
    return (text[:at], True) if at >= 0 else (text, False)


def _events(r: requests.Response, url: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, to ``data: [DONE]``."""
    # chunk_size None: lines as their bytes arrive (a size waits for that many bytes unless
    # the server sends chunks)
    for raw in r.iter_lines(chunk_size=None):  # type: ignore[call-overload]
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            data = json.loads(payload)
        except ValueError:
            raise HHRLHFError(f"{url} sent an event that is not JSON: {payload[:100]!r}") \
                from None
        if isinstance(data, dict) and data.get("error"):
            err = data["error"]
            raise HHRLHFError(f"{url} failed while streaming: "
                              f"{err.get('message') if isinstance(err, dict) else err}")
        if isinstance(data, dict):
            yield data


def _reason(e: Exception) -> str:
    """requests' nested connection error as a few words."""
    text = str(e)
    for needle, words in (("Connection refused", "connection refused (is the server running?)"),
                          ("Name or service not known", "unknown host"),
                          ("nodename nor servname", "unknown host"),
                          ("Temporary failure in name resolution", "unknown host"),
                          ("timed out", "timed out"), ("SSLError", "TLS error"),
                          ("Connection reset", "connection reset")):
        if needle in text:
            return words
    return " ".join(text.split())[:200]
