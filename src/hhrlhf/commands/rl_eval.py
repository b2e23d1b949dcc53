"""`hhrlhf rl eval RUN`: the paper's evaluation of an RL run (see :mod:`hhrlhf.rl.evaluation`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from hhrlhf.commands.options import (
    max_prompts_option,
    output_option,
    pm_option,
    quiet_option,
    sampling_options,
    threads_option,
)
from hhrlhf.errors import HHRLHFError


@click.command("eval")
@click.argument("run", metavar="RUN", type=click.Path())
@click.option("--prompts", "prompt_sources", multiple=True, metavar="SOURCE",
              help="Held-out prompts for the win rates: subsets, preference files or dialogue "
                   "files, as `hhrlhf generate` reads them (repeatable). Without it (and "
                   "--redteam) only the reward-vs-sqrt(KL) fit is computed.")
@max_prompts_option(200)
@click.option("--heldout-pm", type=click.Path(), default=None,
              help="A second PM, trained on other data than the run's PM: its win rate beside "
                   "the trained PM's shows over-optimisation.")
@click.option("--redteam", default=None, metavar="SOURCE",
              help="red-team-attempts (or a file of its rows): PM scores of the responses to "
                   "each transcript's opening Human turn, before and after.")
@click.option("--max-redteam", type=int, default=200, show_default=True,
              help="Red-team openings used (0 = all).")
@click.option("--checkpoints", "with_checkpoints", is_flag=True,
              help="Also the win rates of every checkpoint the run kept, on the --prompts "
                   "(the trained and held-out PMs diverging over training).")
@pm_option("The PM trained against, if it moved (default: the run config's `pm`).",
           required=False)
@click.option("--initial", "initial_override", default=None, metavar="PATH",
              help="The initial policy, if it moved (default: the run config's `policy`); "
                   "or an http(s):// URL of an OpenAI-compatible endpoint serving it (its API "
                   "key from $HHRLHF_API_KEY).")
@sampling_options(shown={"temperature": "the run's, else 1.0", "top_p": "the run's, else 1.0",
                         "top_k": "the run's, else 0",
                         "max_new_tokens": "the run's, else 128",
                         "max_prompt_length": "the run's max_length minus max_new_tokens, "
                                              "else 512"},
                  seed="Sampling (the same for both policies) and bootstrap seed.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Sequences sampled together.")
@click.option("--bootstrap", type=int, default=1000, show_default=True,
              help="Bootstrap resamples of the prompts for the intervals (0 = none).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@output_option("Also write the JSON to this file (atomically).")
@click.option("--samples", "samples_out", type=click.Path(dir_okay=False), default=None,
              help="Write every prompt's two responses and their PM scores here (JSON Lines).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write the reward-vs-sqrt(KL) plot here (PNG; with --checkpoints a second "
                   "panel: the win rates over training).")
@threads_option()
@quiet_option("No progress bar (one shows on a terminal).")
def rl_eval(run: str, prompt_sources: tuple[str, ...], max_prompts: int, heldout_pm: str | None,
            redteam: str | None, max_redteam: int, with_checkpoints: bool,
            pm: str | None,
            initial_override: str | None, temperature: float | None, top_p: float | None,
            top_k: int | None,
            max_new_tokens: int | None, max_prompt_length: int | None, batch_size: int,
            bootstrap: int, seed: int, as_json: bool, output: str | None,
            samples_out: str | None, plot: str | None, threads: int, quiet: bool) -> None:
    """Evaluate the RL run in folder RUN: PM reward against sqrt(KL) over training (linear
    fit), the final policy's win rate and Elo against the initial policy under the PM it was
    trained against and a held-out PM, and the PM harmlessness of its answers to red-team
    opening turns before and after.

    \b
    Examples:
      hhrlhf rl eval runs/rloo --plot reward_kl.png
      hhrlhf rl eval runs/rloo --prompts harmless-base/test --heldout-pm runs/pm-b/model \\
          --redteam red-team-attempts --json
    """
    from hhrlhf.policy.sample import SampleSettings
    from hhrlhf.rl.evaluation import (
        check_output,
        evaluate,
        format_table,
        plot_curve,
        read_run,
    )

    for name, value, low in (("--max-prompts", max_prompts, 0), ("--max-redteam", max_redteam, 0),
                             ("--batch-size", batch_size, 1), ("--bootstrap", bootstrap, 0)):
        if value < low:
            raise HHRLHFError(f"{name} must be at least {low}")
    if heldout_pm is not None and not prompt_sources and redteam is None:
        raise HHRLHFError("--heldout-pm needs prompts to compare on: --prompts or --redteam")
    if with_checkpoints and not prompt_sources:
        raise HHRLHFError("--checkpoints compares on held-out prompts: give --prompts")
    rl_run = read_run(run, initial_override, pm)
    config = rl_run.config

    def from_run(given: float | None, key: str, default: float) -> float:
        if given is not None:
            return given
        v = config.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    new_tokens = int(from_run(max_new_tokens, "max_new_tokens", 128))
    # `hhrlhf rl` keeps max_length (prompt + response); what is left for the prompt
    run_length = from_run(None, "max_length", 0)
    settings = SampleSettings(
        max_new_tokens=new_tokens,
        max_prompt_length=int(from_run(max_prompt_length, "max_prompt_length",
                                       run_length - new_tokens if run_length > new_tokens
                                       else 512)),
        temperature=float(from_run(temperature, "temperature", 1.0)),
        top_p=float(from_run(top_p, "top_p", 1.0)), top_k=int(from_run(top_k, "top_k", 0)),
        seed=seed, batch_size=batch_size)
    if not 0 <= settings.temperature < math.inf or not 0 < settings.top_p <= 1 \
            or settings.top_k < 0:  # nan fails both comparisons
        raise HHRLHFError("--temperature must be a finite number, 0 (greedy) or more, --top-p "
                          "in (0, 1] and --top-k 0 or more")
    if settings.max_new_tokens < 1 or settings.max_prompt_length < 4:
        raise HHRLHFError("--max-new-tokens must be at least 1 and --max-prompt-length 4")
    data = config.get("data")
    trained_on = set(prompt_sources) & {str(d) for d in (data if isinstance(data, list) else [])}
    if trained_on:
        click.echo(f"hhrlhf: note: --prompts names data the run was trained on "
                   f"({', '.join(sorted(trained_on))}); the win rates are then not on held-out "
                   "prompts", err=True)
    inputs = [*prompt_sources, redteam or "", heldout_pm or ""]
    outs = [Path(o).resolve() for o in (output, plot, samples_out) if o is not None]
    if len(set(outs)) < len(outs):
        raise HHRLHFError("--output, --plot and --samples must be different files")
    if output is not None:
        check_output(output, rl_run, inputs)
    if plot is not None:
        check_output(plot, rl_run, inputs)
    if samples_out is not None:
        if not prompt_sources and redteam is None:
            raise HHRLHFError("--samples needs prompts to sample: --prompts or --redteam")
        check_output(samples_out, rl_run, inputs)
    if threads:
        import torch

        torch.set_num_threads(threads)
    ev = evaluate(rl_run, prompt_sources=prompt_sources, max_prompts=max_prompts,
                  redteam=redteam, max_redteam=max_redteam, heldout_pm=heldout_pm,
                  settings=settings, bootstrap=bootstrap, checkpoints=with_checkpoints,
                  progress=not quiet)
    doc = json.dumps(ev.to_json(), indent=2, allow_nan=False)
    from hhrlhf.atomic import write_text
    from hhrlhf.outputs import mark_output

    if output is not None:
        write_text(output, doc + "\n")
        mark_output(output, "rl eval")
    if samples_out is not None:
        write_text(samples_out, "".join(json.dumps(r) + "\n" for r in ev.samples))
        mark_output(samples_out, "rl eval")
    if plot is not None:
        plot_curve(ev, plot)
        mark_output(plot, "rl eval")
    click.echo(doc if as_json else format_table(ev))
