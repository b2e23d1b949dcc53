"""`hhrlhf bon --policy PATH --pm PATH SOURCES --n 16 -o FILE`: best-of-N sampling against a PM.

Prompts: the prompt of each preference row of SOURCES (subsets such as ``harmless-base/test``
or files), every turn before the final Assistant turn, taken from the parsed records; a prompt
repeated across rows is sampled once (``--all-rows``: every row). See :mod:`hhrlhf.bon`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import (
    ENDPOINT_POLICY,
    ModelCommand,
    cut_note,
    endpoint_options,
    given,
    max_prompts_option,
    output_option,
    pm_option,
    policy_option,
    quiet_option,
    sampling_options,
    threads_option,
)
from hhrlhf.errors import HHRLHFError


def _prompts(sources: tuple[str, ...], all_rows: bool, max_prompts: int
             ) -> list[tuple[str, Any]]:
    from hhrlhf.read import resolve
    from hhrlhf.rl.prompts import row_prompts

    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for source in resolve(sources):
        if source.is_redteam:
            raise HHRLHFError("holds red-team transcripts, not preference rows", source.path)
        for index, prompt in row_prompts(source):
            if not prompt.turns:
                continue
            key = prompt.render()
            if not all_rows and key in seen:
                continue
            seen.add(key)
            out.append((f"{source.name}:{index}", prompt))
            if max_prompts and len(out) >= max_prompts:
                return out
    return out


@click.command("bon", cls=ModelCommand)
@policy_option(ENDPOINT_POLICY)
@pm_option()
@click.argument("sources", nargs=-1, required=True)
@click.option("--n", "n", type=int, default=16, show_default=True, help="Samples per prompt.")
@output_option("Preference file to write (official format; .gz compresses).",
               alias="--out")  # its earlier name
@click.option("--rejected", type=click.Choice(["worst", "random"]), default="worst",
              show_default=True,
              help="The rejected side: the lowest-scored other sample, or a random other one.")
@max_prompts_option()
@sampling_options()
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Sequences sampled together (prompts x n).")
@click.option("--pm-batch-size", type=int, default=32, show_default=True,
              help="Dialogues scored together (a prompt's packed row of n responses counts n).")
@click.option("--all-rows", is_flag=True,
              help="Sample every row's prompt, even one repeated in an earlier row.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="PNG: best-of-n reward against KL and against n.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@threads_option()
@quiet_option(alias="--no-progress")  # its earlier name
@endpoint_options
def bon(policy: str, pm: str, sources: tuple[str, ...], n: int, output: str | None,
        output_alias: str | None, rejected: str, max_prompts: int, max_new_tokens: int,
        max_prompt_length: int, temperature: float, top_p: float, top_k: int, seed: int,
        batch_size: int, pm_batch_size: int, all_rows: bool, plot_path: str | None,
        as_json: bool, threads: int, quiet: bool, quiet_alias: bool,
        endpoint_model: str | None, api_key: str | None, endpoint_timeout: float) -> None:
    """Best-of-N: sample N responses per prompt of SOURCES from the --policy, score them with
    the preference model --pm, keep the best.

    Prints the PM reward of best-of-n for n = 1, 2, 4, ..., N (estimated from the same N
    samples) with its KL from the policy, log n - (n-1)/n; -o writes a preference file
    (chosen: the best sample; rejected: see --rejected) that audit, stats and pm train read.

    \b
    Examples:
      hhrlhf bon --policy runs/sft/model --pm runs/pm/model harmless-base/test --n 16 \\
          -o bon.jsonl.gz
      hhrlhf bon --policy runs/sft/model --pm runs/pm/model harmless-base/test \\
          --max-prompts 200 --plot bon.png --json
    """
    out = given(output, output_alias)
    from hhrlhf.extras import require

    require("pm", "hhrlhf bon")
    for name, value, low in (("--n", n, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--batch-size", batch_size, 1), ("--pm-batch-size", pm_batch_size, 1),
                             ("--max-prompts", max_prompts, 0),
                             ("--top-k", top_k, 0), ("--max-prompt-length", max_prompt_length,
                                                     4)):
        if value < low:
            raise HHRLHFError(f"{name} must be at least {low}")
    if not 0 < temperature < math.inf or not 0 < top_p <= 1:  # nan fails both comparisons
        raise HHRLHFError("--temperature must be a finite number above 0 (best-of-N needs "
                          "different samples) and --top-p in (0, 1]")
    if out and plot_path and Path(out).resolve() == Path(plot_path).resolve():
        raise HHRLHFError("--output and --plot name the same file", out)
    from hhrlhf.endpoint import EndpointSampler, is_endpoint
    from hhrlhf.pm.config import resolve_backbone
    from hhrlhf.read import resolve

    remote = is_endpoint(policy)
    if not remote:
        resolve_backbone(policy)
    if not Path(pm).is_dir():
        raise HHRLHFError("no such model folder", pm)
    from hhrlhf.outputs import check_output_file, mark_output

    inputs: list[str | Path] = [pm, *(s.path for s in resolve(sources))]
    if not remote:
        inputs.append(policy)
    for path in (out, plot_path):
        if path:
            check_output_file(path, "bon", inputs=inputs)

    import torch

    from hhrlhf import bon as B
    from hhrlhf.pm import load
    from hhrlhf.policy.model import Policy

    if threads:
        torch.set_num_threads(threads)
    pol: Any
    if remote:
        pol = EndpointSampler(policy, endpoint_model, api_key, endpoint_timeout)
        pol.model  # noqa: B018  # asked now: a wrong URL or key fails before the PM loads
    reward_model = load(pm)
    if not remote:
        pol = Policy.load(policy)
        if torch.cuda.is_available():
            pol.net.to("cuda")
    prompts = _prompts(sources, all_rows, max_prompts)
    if not prompts:
        raise HHRLHFError("no prompts in the sources")
    settings = B.BonSettings(n=n, max_new_tokens=max_new_tokens,
                             max_prompt_length=max_prompt_length, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size,
                             pm_batch_size=pm_batch_size, rejected=rejected)
    def bon_run(write: Any) -> B.BonResult:
        return B.run_bon(pol, reward_model, prompts, settings, write=write,
                         progress=not (quiet or quiet_alias))

    if out:
        with B.jsonl_writer(out) as write:
            result = bon_run(write)
        mark_output(out, "bon")
    else:
        result = bon_run(None)
    points, stops, seconds = result.curve, result.stops, result.seconds
    summary: dict[str, Any] = {
        "policy": policy, "pm": pm, "sources": list(sources), "n": n,
        "settings": {k: v for k, v in vars(settings).items()}, **result.summary()}
    if out:
        summary.update(out=out, pairs=result.pairs, rejected_rule=rejected,
                       no_pair=result.no_pair)
    if plot_path:
        B.plot(points, plot_path, title=f"best-of-n, {len(prompts)} prompts, N = {n}")
        mark_output(plot_path, "bon")
        summary["plot"] = plot_path
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"best-of-{n}: {len(prompts)} prompts x {n} samples in {seconds:.1f} s "
               f"({summary['samples_per_s']} samples/s); stops: "
               + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())))
    click.echo(B.format_table(points))
    if result.context_cut:  # nothing is cut without a word
        click.echo(cut_note(result.context_cut, result.prompts,
                            f"--max-prompt-length {max_prompt_length} tokens"))
    if out:
        click.echo(f"wrote {result.pairs} pairs to {out} (chosen: the best sample; rejected: "
                   f"the {'lowest-scored' if rejected == 'worst' else 'a random'} other sample)"
                   + (f"; {result.no_pair} prompts gave no pair (all samples the same text)"
                      if result.no_pair else ""))
    if plot_path:
        click.echo(f"wrote {plot_path}")
