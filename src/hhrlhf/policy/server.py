"""A policy served over the OpenAI-compatible HTTP API (``hhrlhf policy serve``).

``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``: server-sent
events, ``data: {...}`` chunks then ``data: [DONE]``), ``GET /v1/models`` and ``GET /health``:
the protocol vLLM, TGI and llama.cpp's server speak, so one client
(:class:`hhrlhf.endpoint.EndpointSampler`, the ``openai`` package, curl) talks to any of them.

Prompts are HH dialogues, encoded as ``hhrlhf generate`` encodes them (:class:`PolicyEncoder`,
the end kept), and sampled by the shared-prefill :class:`Sampler`: the ``n`` samples of a
prompt share its prefill, the prompts of one request are decoded together, and a request with
the same prompts, settings and ``seed`` gives what ``hhrlhf generate`` gives. The model runs
one thing at a time: a whole request, or one decode step of the streams in flight. The streams
share one decode batch (:mod:`hhrlhf.policy.batching`: a stream joins between two steps and
leaves when it ends or its client goes; a stalled client holds no one up). A stream alone gives
``generate``'s tokens; beside others its numbers may round differently in the last bits (as in
vLLM). A model whose KV cache cannot be batched has its streams take turns, step by step.

A sample ends at EOS or at the HH next-turn marker ``"\\n\\nHuman:"`` (``finish_reason``
``"stop"``; ``stop_reason`` is the marker, or null for EOS, as vLLM reports it), or after
``max_tokens`` (``"length"``). ``stop`` strings cut the text where they first occur.

Errors are OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad request (malformed JSON included), 401 for a missing or wrong API key, 404 for an unknown
model or path; never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hhrlhf.policy.model import ASSISTANT_MARKER, HUMAN_MARKER, Policy
from hhrlhf.policy.sample import Step
from hhrlhf.records import ASSISTANT, HUMAN, Dialogue, Turn

log = logging.getLogger("hhrlhf.policy.server")

MAX_CHOICES = 4096  # prompts x n in one request: bounds the answer's size
MAX_STOPS = 16
# OpenAI parameters this server does not implement: refused (400) unless left at their default,
# rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools",
               "functions", "tool_choice", "presence_penalty", "frequency_penalty")


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                        code, kind)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- requests ----------------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: see UNSUPPORTED

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: no top-k (vLLM's extension).")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                             description="The same seed and request: the same samples.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    truncate_prompt_tokens: int | None = Field(
        None, ge=4, description="Prompt tokens kept, the end (vLLM's extension); default: "
        "512, or what the policy's positions leave beside max_tokens.")
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(
        description="HH dialogue(s) ending with '\\n\\nAssistant:'.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _refuse_unsupported(req: BaseModel) -> None:
    extra = req.model_extra or {}
    for name in UNSUPPORTED:
        value = extra.get(name)
        if value not in (None, False, 0, {}, []):
            raise APIError(400, f"'{name}' is not supported by this server", name)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"'stop' takes at most {MAX_STOPS} non-empty strings", "stop")
    return stops


def completion_dialogue(prompt: str) -> Dialogue:
    """A completions prompt as the dialogue before its final (empty) Assistant turn."""
    if not prompt.endswith(ASSISTANT_MARKER):
        raise APIError(400, "the prompt must be an HH dialogue ending with "
                            "'\\n\\nAssistant:' (the policy writes the Assistant turn)", "prompt")
    if prompt.startswith(("Human:", "Assistant:")):  # "Human: hi" typed without the blank line
        prompt = "\n\n" + prompt
    d = Dialogue.parse(prompt)
    return Dialogue(d.turns[:-1], d.preamble)


def chat_dialogue(messages: list[ChatMessage]) -> Dialogue:
    """Chat messages as an HH dialogue: user -> Human, assistant -> Assistant; a system (or
    developer) message first is the text before the first turn, as the chat template has it."""
    preamble = ""
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, "only text content is supported", f"messages.{i}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        text = content or ""
        if m.role in ("system", "developer"):
            if turns:
                raise APIError(400, "a system message may only come first", f"messages.{i}")
            preamble += text
            continue
        turns.append(Turn(HUMAN if m.role == "user" else ASSISTANT, text))
    if not turns or turns[-1].role != HUMAN:
        raise APIError(400, "the last message must be the user's (the policy writes the "
                            "assistant's reply)", "messages")
    return Dialogue(tuple(turns), preamble)


# -- sampling ----------------------------------------------------------------------------------
@dataclass
class Job:
    """One request's sampling, checked: its prompts encoded and its settings."""

    prompts: list[np.ndarray]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stops: list[str]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class Engine:
    """The policy, its sampler, the shared decode batch of the streams, and the lock that
    makes a whole request and a decode step take turns."""

    def __init__(self, policy: Policy, batch_size: int = 64, default_max_tokens: int = 128):
        from hhrlhf.policy.batching import BatchDecoder, supports
        from hhrlhf.policy.sample import Sampler

        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.sampler = Sampler(policy.net, policy.tokenizer)
        self.batch_size = batch_size
        self.default_max_tokens = default_max_tokens
        self.positions = int(getattr(policy.config, "max_position_embeddings", None) or 1 << 30)
        self.lock = asyncio.Lock()  # the model runs one thing at a time
        # streams share one decode batch (batch_size rows in all) where the model's cache
        # allows it; otherwise they take turns step by step
        self.decoder = BatchDecoder(self.sampler, batch_size) if supports(self.sampler) \
            else None
        self._driver: asyncio.Task[None] | None = None

    def job(self, dialogues: list[Dialogue], req: _Sampling, max_tokens: int | None) -> Job:
        from hhrlhf.policy.encode import PolicyEncoder

        if len(dialogues) * req.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n is {len(dialogues) * req.n}; at most "
                                f"{MAX_CHOICES} per request", "n")
        new = max_tokens or self.default_max_tokens
        # the prompt's end kept: what was asked (or 512), within what max_tokens leaves
        keep = min(req.truncate_prompt_tokens or 512, self.positions - new)
        if keep < 4:
            raise APIError(400, f"max_tokens {new} leaves no room for a prompt in the "
                                f"policy's {self.positions} positions", "max_tokens")
        try:
            encoder = PolicyEncoder(self.tokenizer, keep + new)
            prompts, _ = encoder.encode_prompts(dialogues, keep)
        except ValueError as e:  # no room beside the role markers
            raise APIError(400, f"{e} (truncate_prompt_tokens {keep}, max_tokens {new})",
                           "truncate_prompt_tokens") from None
        return Job(prompts, req.n, new, req.temperature, req.top_p, max(req.top_k, 0),
                   secrets.randbits(31) if req.seed is None else req.seed, _stops(req.stop))

    def _args(self, job: Job) -> dict[str, Any]:
        return {"n": job.n, "max_new_tokens": job.max_tokens, "temperature": job.temperature,
                "top_p": job.top_p, "top_k": job.top_k, "seed": job.seed,
                "batch_size": self.batch_size}

    def _autocast(self) -> Any:
        import torch

        cuda = self.policy.device.type == "cuda"  # bf16 on a GPU, as `hhrlhf generate`
        return torch.autocast("cuda", torch.bfloat16, enabled=cuda)

    def sample(self, job: Job) -> list[tuple[str, str, str | None, int]]:
        """(text, finish_reason, stop_reason, tokens) per choice, prompt by prompt."""
        with self._autocast():
            samples = self.sampler.sample(job.prompts, **self._args(job))
        out = []
        for s in samples:
            text, finish = s.text, "length" if s.stop == "length" else "stop"
            reason = HUMAN_MARKER if s.stop == "human" else None
            cut = min(((text.find(x), x) for x in job.stops if x in text), default=None)
            if cut is not None:
                text, finish, reason = text[: cut[0]], "stop", cut[1]
            out.append((text, finish, reason, len(s.tokens)))
        return out

    async def stream(self, job: Job) -> AsyncGenerator[list[Step], None]:
        """The job's decode steps as they are made (a list of :class:`Step` each). Closing
        the iterator (a client gone, every text stopped) ends the job's decode."""
        if self.decoder is None:
            async for step in self._take_turns(job):
                yield step
            return
        from hhrlhf.policy.batching import DecodeStream

        stream = DecodeStream(job.prompts, job.n, job.max_tokens, job.temperature, job.top_p,
                              job.top_k, job.seed, self.batch_size, self.sampler.device)
        ready = asyncio.Event()
        stream.deliver = ready.set
        self.decoder.add(stream)
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive())
        try:
            while True:
                await ready.wait()
                ready.clear()
                items, stream.outbox = stream.outbox, []
                for item in items:
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            stream.cancelled = True  # out of the batch before the next step

    async def _drive(self) -> None:
        """Decode steps while any stream is in flight or waiting, each handed to its
        streams."""
        decoder = self.decoder
        assert decoder is not None

        def step() -> list[Any]:
            with self._autocast():
                return decoder.step()

        try:
            while decoder.busy():
                async with self.lock:
                    touched = await anyio.to_thread.run_sync(step)
                for stream in touched:
                    stream.deliver()
        except Exception as e:  # a failed step fails every stream in flight, not the server
            log.exception("decode step failed")
            for stream in decoder.streams():
                stream.outbox.append(e)
                stream.deliver()
            decoder.reset()
        finally:
            self._driver = None

    async def _take_turns(self, job: Job) -> AsyncGenerator[list[Step], None]:
        """A policy whose cache cannot be batched: the job's own decode, one step at a time
        under the lock, so that streams take turns and a stalled client holds no one up."""
        steps = self.sampler.stream(job.prompts, **self._args(job))

        def next_step() -> list[Step] | None:
            try:
                with self._autocast():
                    return list(next(steps))
            except StopIteration:
                return None

        try:
            while True:
                async with self.lock:
                    step = await anyio.to_thread.run_sync(next_step)
                if step is None:
                    return
                yield step
        finally:
            steps.close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(policy: Policy, model_name: str, api_key: str | None = None,
               batch_size: int = 64, default_max_tokens: int = 128) -> FastAPI:
    """The OpenAI-compatible app serving ``policy`` as ``model_name``; with ``api_key``, every
    ``/v1`` request needs ``Authorization: Bearer <api_key>``."""
    from hhrlhf.policy.textstream import TextStream

    engine = Engine(policy, batch_size, default_max_tokens)
    created = int(time.time())
    # no /docs or /redoc: they load their scripts from a CDN (and the API is OpenAI's);
    # /openapi.json stays
    app = FastAPI(title="hhrlhf policy", version="1", docs_url=None, redoc_url=None,
                  description="An HH policy over the OpenAI-compatible completions API.")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = jsonable_encoder(exc.errors())
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(f"{param}: {message}" if param else message,
                                       param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"nothing at {request.method} {request.url.path}"
        return JSONResponse(error_body(message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        log.exception("error serving %s", request.url.path)  # the traceback: server log only
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error"),
                            status_code=500)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "a missing or wrong API key (send 'Authorization: Bearer "
                                "<key>')", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server has "
                                f"'{model_name}'", "model", "model_not_found")

    num_params = sum(p.numel() for p in policy.net.parameters())

    def card() -> dict[str, Any]:
        # num_params: an extension (clients that do not know it ignore it); `hhrlhf collect`
        # records it as the red-team file's model size
        return {"id": model_name, "object": "model", "created": created, "owned_by": "hhrlhf",
                "num_params": num_params}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @v1.get("/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @v1.get("/models/{model:path}")
    def model(model: str) -> dict[str, Any]:
        check_model(model)
        return card()

    def usage(job: Job, completion: int) -> dict[str, int]:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    async def answer(req: _Sampling, dialogues: list[Dialogue], max_tokens: int | None,
                     chat: bool) -> Response:
        _refuse_unsupported(req)
        check_model(req.model)
        # tokenizing thousands of prompts takes a while: not on the event loop
        job = await anyio.to_thread.run_sync(engine.job, dialogues, req, max_tokens)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            with_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(job, head, chat, with_usage),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        async with engine.lock:
            results = await anyio.to_thread.run_sync(engine.sample, job)
        choices: list[dict[str, Any]] = []
        for j, (text, finish, reason, _) in enumerate(results):
            if chat:  # the space after "Assistant:" separates the turn; not the reply's
                choices.append({"index": j, "message": {"role": "assistant",
                                                        "content": text.removeprefix(" ")},
                                "logprobs": None, "finish_reason": finish,
                                "stop_reason": reason})
            else:
                choices.append({"index": j, "text": text, "logprobs": None,
                                "finish_reason": finish, "stop_reason": reason})
        return JSONResponse({**head, "choices": choices,
                             "usage": usage(job, sum(r[3] for r in results))})

    async def stream(job: Job, head: dict[str, Any], chat: bool, with_usage: bool
                     ) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        count = len(job.prompts) * job.n
        texts = [TextStream(engine.tokenizer, [HUMAN_MARKER, *job.stops]) for _ in range(count)]
        finished = [False] * count
        fresh = [True] * count  # chat: no chunk (with the role) sent yet
        lead = [chat] * count  # chat: the turn's leading space may still come (and is cut)
        tokens = 0

        def chunk(j: int, delta: str, finish: str | None, reason: str | None) -> str:
            if chat:
                body: dict[str, Any] = {} if finish and not delta else {"content": delta}
                if fresh[j]:
                    body["role"] = "assistant"
                    fresh[j] = False
                choice = {"index": j, "delta": body, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": j, "text": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = reason
            return _sse({**head, "choices": [choice]})

        # The streams in flight are decoded together, one step at a time; a client that
        # reads slowly, or stalls without closing, holds no other stream up.
        steps = engine.stream(job)
        try:
            async for step in steps:
                out = []
                for s in step:
                    j = s.prompt_index * job.n + s.sample_index
                    tokens += 1
                    if finished[j]:
                        continue  # a stop string ended its text; the sampler goes on
                    t = texts[j]
                    delta = t.push(s.token)
                    if s.stop is not None:
                        delta += t.finish()
                    if lead[j] and delta:
                        delta, lead[j] = delta.removeprefix(" "), False
                    finish = reason = None
                    if t.done:
                        finished[j] = True
                        finish = "length" if s.stop == "length" and t.stopped is None \
                            else "stop"
                        reason = t.stopped
                    if delta or finish:
                        out.append(chunk(j, delta, finish, reason))
                for text in out:
                    yield text
                if all(finished):
                    break
        finally:
            await steps.aclose()  # a client gone, or every text stopped: the decode ends
        if with_usage:
            yield _sse({**head, "choices": [], "usage": usage(job, tokens)})
        yield "data: [DONE]\n\n"

    @v1.post("/completions")
    async def completions(req: CompletionRequest) -> Response:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "'prompt' is empty", "prompt")
        return await answer(req, [completion_dialogue(p) for p in prompts], req.max_tokens,
                            chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest) -> Response:
        return await answer(req, [chat_dialogue(req.messages)],
                            req.max_completion_tokens or req.max_tokens, chat=True)

    app.include_router(v1)
    return app
