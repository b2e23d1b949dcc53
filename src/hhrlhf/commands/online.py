"""`hhrlhf online --out DIR`: the iterated online loop (collect, retrain the PM, retrain the
policy, again); `hhrlhf online report DIR` prints its table and draws its curves.

``hhrlhf online [SOURCES...]`` is ``hhrlhf online run [SOURCES...]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import config_options, out_dir_option, quiet_option


class OnlineGroup(click.Group):
    """``run`` is the default subcommand (as ``train`` is ``hhrlhf rl``'s)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in ("run", "report", "--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("online", cls=OnlineGroup)
def online() -> None:
    """The iterated online loop of the HH-RLHF paper, labelled by simulated annotators or by
    people in the `hhrlhf collect` app (--set labels=collect):
    `hhrlhf online [SOURCES] --out DIR` runs it, `hhrlhf online report DIR` reports it.

    \b
    Examples:
      hhrlhf online harmless-base/test --out runs/online --set rounds=3
      hhrlhf online --out runs/online --set labels=collect --set collect_port=8000
      hhrlhf online --out runs/online --resume
      hhrlhf online report runs/online
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf online")


@online.command("run")
@click.argument("sources", nargs=-1, metavar="[SOURCES]...")
@out_dir_option("Run folder (one round-RR folder per round).")
@click.option("--rounds", type=int, help="Rounds after round 0 (default 3).")
@click.option("--pairs", type=click.Choice(["random", "best_vs_random", "active"]),
              help="Which pairs are labelled (default random).")
@click.option("--method", type=click.Choice(["bon_sft", "dpo", "rloo", "ppo"]),
              help="The policy step: best-of-N distillation (default), DPO, RLOO or PPO.")
@config_options(example="pairs_per_round=128")
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@quiet_option("No progress lines.")
def run(sources: tuple[str, ...], config_file: str | None, assignments: tuple[str, ...],
        resume: bool, quiet: bool, **options: Any) -> None:
    """Round 0: SFT a policy and fit a PM on one fold of SOURCES (default helpful-base/train);
    then each round deploys the policy, has pairs of its responses labelled by simulated
    annotators (a judge PM fitted on the other fold) or, with labels=collect, by people in
    the collect app (invite them with `hhrlhf collect invite --db DIR/collect.sqlite`; the
    round waits for its quota), refits the PM on all labels so far, improves the policy
    against it, and evaluates. Every round's files in DIR/round-RR."""
    from hhrlhf.online.loop import OnlineConfig, format_table, run_online
    from hhrlhf.runs import apply_overrides, parse_assignments, resolve_config

    explicit: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if sources:
        explicit["data"] = list(sources)
    if quiet:
        explicit["progress"] = False
    explicit.update(parse_assignments(assignments))
    # a resumed loop may go on for more rounds: the rounds run so far do not depend on it
    rounds = explicit.pop("rounds", None) if resume else None
    config = resolve_config(OnlineConfig, config_file, explicit, resume)
    if rounds is not None:
        config = apply_overrides(config, {"rounds": rounds}).validate()
    from hhrlhf.read import resolve

    resolve(config.data)
    results = run_online(config, resume=resume)
    click.echo(format_table(results))
    click.echo(f"rounds: {Path(config.out_dir)}/round-RR/result.json; "
               f"`hhrlhf online report {config.out_dir}` draws the curves")


@online.command("report")
@click.argument("run_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="The PNG to write (default DIR/online.png).")
def report(run_dir: str, plot_path: str | None) -> None:
    """Print the rounds' table (judge win rate and Elo against round 0 and the previous round
    with 95% bootstrap intervals, the PM's accuracy, labels used) and each round's policy
    step (PM reward against sqrt(KL)), and draw the curves."""
    from hhrlhf.online.loop import format_curves, format_table, plot, read_results

    results = read_results(run_dir)
    click.echo(format_table(results))
    curves = format_curves(results)
    if curves:
        click.echo("policy step, PM reward against sqrt(KL):")
        click.echo(curves)
    path = plot(results, plot_path or Path(run_dir) / "online.png")
    click.echo(f"curves: {path}")
