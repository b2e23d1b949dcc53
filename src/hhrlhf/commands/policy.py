"""`hhrlhf policy serve --policy PATH`: a policy over the OpenAI-compatible HTTP API
(see :mod:`hhrlhf.policy.server`)."""

from __future__ import annotations

import secrets

import click

from hhrlhf.commands.explorer import _LOOPBACK, _bind
from hhrlhf.commands.options import ModelCommand, policy_option, threads_option
from hhrlhf.errors import HHRLHFError

API_KEY_ENV = "HHRLHF_API_KEY"


@click.group("policy")
def policy() -> None:
    """Serve a policy: `hhrlhf policy serve --policy PATH`."""


@policy.command("serve", cls=ModelCommand)
@policy_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--model-name", default=None,
              help="The model name clients ask for.  [default: --policy as given]")
@click.option("--api-key", envvar=API_KEY_ENV, default=None,
              help=f"Require 'Authorization: Bearer KEY' (also ${API_KEY_ENV}). Off 127.0.0.1 "
                   "without one, a key is made and printed.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="max_tokens for a request that gives none.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Sequences decoded together (prompts x n): a request's, and all the "
                   "streams' in flight.")
@threads_option()
def serve(policy: str, host: str, port: int, model_name: str | None, api_key: str | None,
          max_new_tokens: int, batch_size: int, threads: int) -> None:
    """Serve the --policy (a model folder) over the OpenAI-compatible API: POST /v1/completions
    (HH prompts ending with "\\n\\nAssistant:"), POST /v1/chat/completions, GET /v1/models;
    both POSTs stream with "stream": true.

    \b
    Examples:
      hhrlhf policy serve --policy runs/dpo/model --model-name hh-dpo
      hhrlhf generate --policy http://127.0.0.1:8000/v1 harmless-base/test --n 4 --max-prompts 10
    """
    from hhrlhf.extras import require

    model = policy
    require("pm", "hhrlhf policy serve")
    require("explorer", "hhrlhf policy serve")
    if api_key is not None and not api_key.strip():
        raise HHRLHFError(f"--api-key (or ${API_KEY_ENV}) is empty")
    from hhrlhf.pm.config import resolve_backbone

    resolve_backbone(model)
    sock = _bind(host, port)  # before the model loads: a bad --host or --port fails at once
    try:
        import torch

        from hhrlhf.policy.model import Policy

        if threads:
            torch.set_num_threads(threads)
        pol = Policy.load(model)
        if torch.cuda.is_available():
            pol.net.to("cuda")
    except BaseException:
        sock.close()
        raise
    import uvicorn

    from hhrlhf.policy.server import create_app

    made = False
    if api_key is None and host not in _LOOPBACK:  # reachable from elsewhere: never keyless
        api_key, made = secrets.token_urlsafe(24), True
    name = model_name or model
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {model} as model {name!r} at http://{shown}:{port}/v1 "
               f"({'API key required' if api_key else 'no API key'}; Ctrl+C to stop)")
    if made:
        click.echo(f"API key (made for this run, as --host is not loopback): {api_key}")
    app = create_app(pol, name, api_key=api_key, batch_size=batch_size,
                     default_max_tokens=max_new_tokens)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
