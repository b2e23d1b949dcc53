"""`hhrlhf collect`: run the feedback interface (serve), let people in (invite), write the
official files (export)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hhrlhf.errors import HHRLHFError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DB_HELP = "SQLite database file (created when missing), or a postgresql:// URL."


@click.group("collect", no_args_is_help=True)
def collect() -> None:
    """Collect comparisons and red-team attempts from your own annotators (a local web app)."""


@collect.command("invite")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--name", required=True, help="Who this is (shown on the admin page only).")
@click.option("--role", type=click.Choice(["annotator", "reviewer", "admin"]),
              default="annotator", show_default=True)
@click.option("--upworker", is_flag=True,
              help="Mark as a contractor (the red-team file's is_upworker).")
@click.option("--url", "base_url", default="http://127.0.0.1:8000", show_default=True,
              help="Where the server is reached, for the printed link.")
def invite(db: str, name: str, role: str, upworker: bool, base_url: str) -> None:
    """Add a person and print their private link (the token is shown once, stored hashed)."""
    from hhrlhf.collect.store import open_store

    store = open_store(db)
    aid, token = store.add_annotator(name, role, upworker)
    store.close()
    click.echo(f"{role} {aid} ({name}): {base_url.rstrip('/')}/join/{token}")


@collect.command("revoke")
@click.argument("who")
@click.option("--db", required=True, help=DB_HELP)
def revoke(who: str, db: str) -> None:
    """End a person's sessions at once and stop their invite link from signing in again.

    WHO is their annotator id (as `invite` printed it), their invite token or link. Their
    work stays, and is exported; the admin page shows them as revoked. To let them back in,
    invite them again (a new id).
    """
    from hhrlhf.collect.store import open_existing_store

    store = open_existing_store(db)
    try:
        found, ended = store.revoke(who)
    finally:
        store.close()
    click.echo(f"revoked {found.role} {found.id} ({found.name}): {ended} session"
               f"{'' if ended == 1 else 's'} ended; the invite link no longer signs in")


@collect.command("export")
@click.argument("db")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (replaced as a whole; an earlier export or a new folder).")
@click.option("--pm", "pm_folder", type=click.Path(path_type=Path),
              help="Preference model for the red-team harmlessness scores (needed unless "
                   "the server ran with --pm).")
@click.option("--card-spelling", is_flag=True,
              help="Name the task score 'task_description_harmlessness_score' (the dataset "
                   "card's spelling) instead of the published file's 'task_descripton_...'.")
def export(db: str, out: Path, pm_folder: Path | None, card_spelling: bool) -> None:
    """Write the collected work as the official files (DB: an SQLite file or a URL)."""
    from hhrlhf.collect.export import export as run_export
    from hhrlhf.collect.store import open_existing_store

    store = open_existing_store(db)
    try:
        result = run_export(store, out, pm_folder=pm_folder, card_spelling=card_spelling)
    finally:
        store.close()
    click.echo(f"hhrlhf collect export: {result.summary()}", err=True)


@collect.command("serve")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--policy", default=None,
              help="Policy folder (decoded in a child process, `hhrlhf policy serve`), or "
                   "an OpenAI-compatible URL (not for --task review).")
@click.option("--policy-b", default=None,
              help="A second policy: each comparison then pits one response of each "
                   "(the annotator is not told which is which).")
@click.option("--task", required=True,
              type=click.Choice(["helpful", "harmless", "redteam", "review"]))
@click.option("--pm", "pm_folder", type=click.Path(path_type=Path),
              help="Preference model: red-team attempts are scored when they are closed.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback opens it to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--overlap", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Share of comparisons also shown to a second annotator (agreement).")
@click.option("--model-type", default="plain lm", show_default=True,
              help="The red-team file's model_type of --policy.")
@click.option("--num-params", default=None,
              help="The red-team file's num_params (e.g. 52B); counted for a folder.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--rate", default=120, show_default=True, type=click.IntRange(1),
              help="Writes per minute allowed to each annotator.")
def serve(db: str, policy: str | None, policy_b: str | None, task: str, pm_folder: Path | None,
          host: str, port: int, overlap: float, model_type: str, num_params: str | None,
          max_new_tokens: int, temperature: float, top_p: float, rate: int) -> None:
    """Serve the annotation app for one task (annotators use their invite link)."""
    from hhrlhf.extras import require

    require("explorer", "hhrlhf collect serve")
    import uvicorn

    from hhrlhf.collect.app import AppConfig, create_app
    from hhrlhf.collect.responder import Responder, Settings, make_responder
    from hhrlhf.collect.store import open_store
    from hhrlhf.commands.explorer import _bind

    if num_params is not None:
        from hhrlhf.records import MalformedRow, parse_num_params

        try:
            parse_num_params(num_params)
        except MalformedRow as e:
            raise HHRLHFError(f"--num-params: {e}") from None
    if task != "review" and policy is None:
        raise HHRLHFError(f"--task {task} needs --policy (a folder or a URL)")
    sock = _bind(host, port)  # a bad --host or a busy --port fails before the model loads
    responders: list[Responder] = []
    try:
        try:
            settings = Settings(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p)
            if task != "review":
                assert policy is not None
                # a folder starts its decode process here (`hhrlhf policy serve`, a child)
                responders.append(make_responder(policy, settings, model_type, num_params))
                if policy_b:
                    responders.append(make_responder(policy_b, settings, model_type,
                                                     num_params))
            if task == "redteam" and responders[0].describe().num_params is None:
                raise HHRLHFError("--num-params is needed for a policy behind a URL (the "
                                  "red-team file records the model size)")
            pm = None
            if pm_folder is not None:
                from hhrlhf.pm import load

                pm = load(pm_folder)
            store = open_store(db)
        except BaseException:
            sock.close()
            raise
        app = create_app(AppConfig(store=store, task=task, responders=responders, pm=pm,
                                   overlap=overlap, rate_per_minute=rate))
        if host not in _LOOPBACK:
            click.echo(f"hhrlhf: note: listening on {host}: anyone with an invite link who can "
                       "reach this machine can work here; put TLS in front of it", err=True)
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"collecting {task} into {db} at http://{shown}:{port}/ (Ctrl+C to stop); "
                   "invite people with `hhrlhf collect invite`", file=sys.stdout)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        for r in responders:  # the decode processes end with the server
            r.close()
