"""`hhrlhf bon POLICY PM SOURCES --n 16 --out FILE`: best-of-N sampling against a PM.

Prompts: the prompt of each preference row of SOURCES (subsets such as ``harmless-base/test``
or files), every turn before the final Assistant turn, taken from the parsed records; a prompt
repeated across rows is sampled once (``--all-rows``: every row). See :mod:`hhrlhf.bon`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hhrlhf.errors import HHRLHFError

_PNG = b"\x89PNG\r\n\x1a\n"


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


def _check_output(path: str, kind: str, inputs: list[Path], folders: list[Path]) -> None:
    """Refuse to write over an input, into the policy or PM folder, or over an existing file
    that is not what this command writes (a preference file, a PNG)."""
    dest = Path(path).resolve()
    if any(dest == p.resolve() for p in inputs):
        raise HHRLHFError("refusing to write over an input", path)
    if any(f.resolve() in dest.parents for f in folders):
        raise HHRLHFError("refusing to write into the policy or PM folder", path)
    if dest.is_dir():
        raise HHRLHFError("is a folder", path)
    if not dest.exists() or dest.stat().st_size == 0:
        return
    if kind == "png":
        with open(dest, "rb") as fh:
            ok = fh.read(8) == _PNG
    else:
        from hhrlhf.read import iter_json_rows

        try:
            ok = False
            for _, obj in iter_json_rows(dest):
                ok = isinstance(obj, dict) and set(obj) == {"chosen", "rejected"}
                break
        except HHRLHFError:
            ok = False
    if not ok:
        raise HHRLHFError(f"refusing to replace a file that is not a {kind} file hhrlhf "
                          "writes", path)


@click.command("bon")
@click.argument("policy", type=click.Path())
@click.argument("pm", type=click.Path())
@click.argument("sources", nargs=-1, required=True)
@click.option("--n", "n", type=int, default=16, show_default=True, help="Samples per prompt.")
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Preference file to write (official format; .gz compresses).")
@click.option("--rejected", type=click.Choice(["worst", "random"]), default="worst",
              show_default=True,
              help="The rejected side: the lowest-scored other sample, or a random other one.")
@click.option("--max-prompts", type=int, default=0, help="Stop after N prompts (0 = all).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--max-prompt-length", type=int, default=512, show_default=True,
              help="Prompt tokens kept (the end of the dialogue).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = no top-k.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Sequences sampled together (prompts x n).")
@click.option("--pm-batch-size", type=int, default=32, show_default=True,
              help="Dialogues scored together (a prompt's packed row of n responses counts n).")
@click.option("--all-rows", is_flag=True,
              help="Sample every row's prompt, even one repeated in an earlier row.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="PNG: best-of-n reward against KL and against n.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def bon(policy: str, pm: str, sources: tuple[str, ...], n: int, out: str | None,
        rejected: str, max_prompts: int, max_new_tokens: int, max_prompt_length: int,
        temperature: float, top_p: float, top_k: int, seed: int, batch_size: int,
        pm_batch_size: int, all_rows: bool, plot_path: str | None, as_json: bool, threads: int,
        no_progress: bool) -> None:
    """Best-of-N: sample N responses per prompt of SOURCES from the policy in folder POLICY,
    score them with the preference model in folder PM, keep the best.

    Prints the PM reward of best-of-n for n = 1, 2, 4, ..., N (estimated from the same N
    samples) with its KL from the policy, log n - (n-1)/n; --out writes a preference file
    (chosen: the best sample; rejected: see --rejected) that audit, stats and pm train read.

    \b
    Examples:
      hhrlhf bon runs/sft/model runs/pm/model harmless-base/test --n 16 --out bon.jsonl.gz
      hhrlhf bon runs/sft/model runs/pm/model harmless-base/test --max-prompts 200 \\
          --plot bon.png --json
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf bon")
    for name, value, low in (("--n", n, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--batch-size", batch_size, 1), ("--pm-batch-size", pm_batch_size, 1),
                             ("--max-prompts", max_prompts, 0),
                             ("--top-k", top_k, 0), ("--max-prompt-length", max_prompt_length,
                                                     4)):
        if value < low:
            raise HHRLHFError(f"{name} must be at least {low}")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise HHRLHFError("--temperature must be above 0 (best-of-N needs different samples) "
                          "and --top-p in (0, 1]")
    if out and plot_path and Path(out).resolve() == Path(plot_path).resolve():
        raise HHRLHFError("--out and --plot name the same file", out)
    from hhrlhf.pm.config import resolve_backbone
    from hhrlhf.read import resolve

    resolve_backbone(policy)
    if not Path(pm).is_dir():
        raise HHRLHFError("no such model folder", pm)
    inputs = [s.path for s in resolve(sources)]
    folders = [Path(policy), Path(pm)]
    if out:
        _check_output(out, "preference", inputs, folders)
    if plot_path:
        _check_output(plot_path, "png", inputs, folders)

    import numpy as np
    import torch

    from hhrlhf import bon as B
    from hhrlhf.pm import load
    from hhrlhf.policy.model import Policy

    if threads:
        torch.set_num_threads(threads)
    reward_model = load(pm)
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
    from tqdm import tqdm

    rewards: list[np.ndarray] = []
    stops: dict[str, int] = {}
    pairs = no_pair = 0
    rng = np.random.default_rng(seed)
    started = time.perf_counter()

    def chunks() -> Iterator[list[B.BonPrompt]]:
        with tqdm(total=len(prompts), desc=f"best-of-{n}", unit="prompt", file=sys.stderr,
                  disable=no_progress, dynamic_ncols=True) as bar:
            for chunk in B.run(pol, reward_model, prompts, settings):
                bar.update(len(chunk))
                yield chunk

    def consume(write: Any) -> None:
        nonlocal pairs, no_pair
        for chunk in chunks():
            for r in chunk:
                rewards.append(r.rewards)
                for s in r.stops:
                    stops[s] = stops.get(s, 0) + 1
            if write is not None:
                rows, none = B.preference_rows(chunk, rejected, rng)
                for row in rows:
                    write(row)
                pairs += len(rows)
                no_pair += none

    if out:
        with B.jsonl_writer(out) as write:
            consume(write)
    else:
        consume(None)
    seconds = time.perf_counter() - started
    matrix = np.stack(rewards)
    points = B.curve(matrix)
    summary: dict[str, Any] = {
        "policy": policy, "pm": pm, "sources": list(sources), "prompts": len(prompts),
        "n": n, "settings": {k: v for k, v in vars(settings).items()},
        "curve": points, "reward_mean": float(matrix.mean()),
        "reward_best_mean": points[-1]["reward_mean"], "stops": stops,
        "seconds": round(seconds, 2), "samples_per_s": round(matrix.size / seconds, 2),
    }
    if out:
        summary.update(out=out, pairs=pairs, rejected_rule=rejected, no_pair=no_pair)
    if plot_path:
        B.plot(points, plot_path, title=f"best-of-n, {len(prompts)} prompts, N = {n}")
        summary["plot"] = plot_path
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"best-of-{n}: {len(prompts)} prompts x {n} samples in {seconds:.1f} s "
               f"({summary['samples_per_s']} samples/s); stops: "
               + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())))
    click.echo(B.format_table(points))
    if out:
        click.echo(f"wrote {pairs} pairs to {out} (chosen: the best sample; rejected: the "
                   f"{'lowest-scored' if rejected == 'worst' else 'a random'} other sample)"
                   + (f"; {no_pair} prompts gave no pair (all samples the same text)"
                      if no_pair else ""))
    if plot_path:
        click.echo(f"wrote {plot_path}")
