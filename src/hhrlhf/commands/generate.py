"""`hhrlhf generate --policy PATH [SOURCES|FILE|-]`: sample responses to HH prompts.

The policy is a model folder, or an http(s):// URL of an OpenAI-compatible completions endpoint
(``hhrlhf policy serve``, vLLM, TGI, llama.cpp's server; :mod:`hhrlhf.endpoint`), which then
samples instead: the prompts go as text and the server keeps their end.

A prompt is a dialogue up to its final ``Assistant:`` turn. Inputs:

- subsets (``harmless-base/test``) or preference files (rows with ``chosen``/``rejected``): the
  prompt of each row (a prompt repeated across rows is sampled once), id ``SOURCE:ROW``;
- a file of dialogues, or ``-`` (stdin, the default), in the rows ``hhrlhf pm score`` reads
  (``{"text": ...}``, ``{"chosen": ..., "rejected": ...}``, a JSON string or a plain line);
  a final Assistant turn is dropped (it is what is generated); id: the row's ``"id"``, else its
  line number.

Output, JSON Lines (stdout, or ``--output`` written atomically), one row per sample::

    {"id": "P/k", "prompt_id": "P", "sample": k, "text": "<prompt>\\n\\nAssistant: <response>",
     "response": "...", "stop": "eos" | "human" | "length"}

``text`` is the whole HH-format dialogue, which ``hhrlhf pm score`` scores and the data layer
(:class:`hhrlhf.records.Dialogue`) parses.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from hhrlhf.commands.options import (
    AUTO_PROMPT,
    ENDPOINT_POLICY,
    ModelCommand,
    cut_note,
    endpoint_options,
    max_prompts_option,
    output_option,
    policy_option,
    quiet_option,
    sampling_options,
    threads_option,
)
from hhrlhf.errors import HHRLHFError

_CHUNK = 256  # prompts read before sampling: bounded memory on endless stdin


@click.command("generate", cls=ModelCommand)
@policy_option(ENDPOINT_POLICY)
@click.argument("sources", nargs=-1)
@click.option("--n", "n", type=int, default=1, show_default=True, help="Samples per prompt.")
@sampling_options(defaults={"max_prompt_length": 0}, shown={"max_prompt_length": AUTO_PROMPT})
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Sequences decoded together (prompts x samples).")
@max_prompts_option()
@click.option("--all-rows", is_flag=True,
              help="Sample every row's prompt, even one repeated in an earlier row.")
@quiet_option("No progress bar (one shows on a terminal).")
@output_option()
@threads_option()
@endpoint_options
def generate(policy: str, sources: tuple[str, ...], n: int, temperature: float, top_p: float,
             top_k: int, max_new_tokens: int, max_prompt_length: int, seed: int,
             batch_size: int, max_prompts: int, all_rows: bool, quiet: bool,
             output: str | None, threads: int, endpoint_model: str | None, api_key: str | None,
             endpoint_timeout: float) -> None:
    """Sample N responses per prompt of SOURCES (subsets, files, or - for stdin) from the
    --policy; the prefill of a prompt is computed once for its N samples.

    \b
    Examples:
      hhrlhf generate --policy runs/sft/model harmless-base/test --n 8 --max-prompts 100 -o samples.jsonl
      echo 'Human: How do I bake bread?' | hhrlhf generate --policy runs/dpo/model --temperature 0
      hhrlhf generate --policy runs/dpo/model harmless-base/test --n 4 | hhrlhf pm score runs/pm/model
      hhrlhf generate --policy http://127.0.0.1:8000/v1 harmless-base/test --n 4 --max-prompts 10
    """
    model = policy
    from hhrlhf.endpoint import EndpointSampler, is_endpoint
    from hhrlhf.extras import require

    remote = is_endpoint(model)
    if not remote:
        require("pm", "hhrlhf generate")
    for name, value, low in (("--n", n, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--batch-size", batch_size, 1), ("--max-prompts", max_prompts, 0),
                             ("--top-k", top_k, 0), ("--max-prompt-length", max_prompt_length,
                                                     0)):
        if value < low:
            raise HHRLHFError(f"{name} must be at least {low}")
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1:  # nan fails both comparisons
        raise HHRLHFError("--temperature must be a finite number, 0 or more, and --top-p in "
                          "(0, 1]")
    if output is not None:
        from hhrlhf.outputs import check_output_file

        check_output_file(output, "generate", inputs=[*([] if remote else [model]), *sources])
    if remote:
        endpoint = EndpointSampler(model, endpoint_model, api_key, endpoint_timeout)
        endpoint.model  # noqa: B018  # asked now: a wrong URL or key fails before any reading
    else:
        from hhrlhf.pm.config import resolve_backbone

        resolve_backbone(model)
    for src in sources:
        if src != "-" and not Path(src).exists():
            from hhrlhf.read import resolve

            resolve([src])
    from hhrlhf.records import Dialogue, response_turn
    from hhrlhf.rl.prompts import dialogue_prompts

    sample: Callable[[list[Any], int], tuple[list[Any], int]]
    if remote:
        def sample(dialogues: list[Any], chunk_no: int) -> tuple[list[Any], int]:
            # the endpoint cuts (or refuses) long prompts by its own rules: none counted here
            return endpoint.sample(dialogues, n=n, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k,
                                   seed=seed + chunk_no,
                                   max_prompt_length=max_prompt_length or None), 0
    else:
        sample = _local_sampler(model, n, temperature, top_p, top_k, max_new_tokens,
                                max_prompt_length, seed, batch_size, threads)

    from tqdm import tqdm

    # progress on a terminal only (disable=None), never in a pipe or a log
    bar = tqdm(total=max_prompts or None, desc="generate", unit="prompt", file=sys.stderr,
               disable=True if quiet else None, dynamic_ncols=True)
    counts = {"prompts": 0, "cut": 0}

    def rows() -> Iterator[dict[str, Any]]:
        chunk: list[tuple[str, Any]] = []
        chunk_no = 0
        for done, item in enumerate(dialogue_prompts(sources, unique=not all_rows), start=1):
            chunk.append(item)
            last = bool(max_prompts) and done >= max_prompts
            if len(chunk) >= _CHUNK or last:
                yield from sampled(chunk, chunk_no)
                chunk, chunk_no = [], chunk_no + 1
            if last:
                return
        if chunk:
            yield from sampled(chunk, chunk_no)

    def sampled(chunk: list[tuple[str, Any]], chunk_no: int) -> Iterator[dict[str, Any]]:
        samples, cut = sample([d for _, d in chunk], chunk_no)
        counts["prompts"] += len(chunk)
        counts["cut"] += cut
        bar.update(len(chunk))
        for s in samples:
            pid, d = chunk[s.prompt_index]
            # cut where the policy starts a new turn, as bon and rl score it
            turn = response_turn(s.text)
            yield {"id": f"{pid}/{s.sample_index}", "prompt_id": pid, "sample": s.sample_index,
                   "text": Dialogue(d.turns + (turn,), d.preamble).render(),
                   "response": turn.sep + turn.text, "stop": s.stop}

    def write(fh: IO[str]) -> None:
        for row in rows():
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    if output is None:
        write(sys.stdout)
    else:
        from hhrlhf.outputs import command_output

        with command_output(output, "generate") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
    bar.close()
    if counts["cut"]:  # nothing is cut without a word
        click.echo(f"hhrlhf: {cut_note(counts['cut'], counts['prompts'], 'the prompt length')}"
                   "; their rows' text holds the whole dialogue", err=True)


def _local_sampler(model: str, n: int, temperature: float, top_p: float, top_k: int,
                   max_new_tokens: int, max_prompt_length: int, seed: int, batch_size: int,
                   threads: int) -> Callable[[list[Any], int], tuple[list[Any], int]]:
    """The policy in folder ``model``, loaded: a function sampling a chunk of dialogues."""
    import torch

    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.sample import Sampler

    if threads:
        torch.set_num_threads(threads)
    policy = Policy.load(model)
    max_prompt_length = policy.prompt_length(max_new_tokens, max_prompt_length)
    if torch.cuda.is_available():
        policy.net.to("cuda")
    encoder = PolicyEncoder(policy.tokenizer, max_prompt_length + max_new_tokens)
    sampler = Sampler(policy.net, policy.tokenizer)

    def sample(dialogues: list[Any], chunk_no: int) -> tuple[list[Any], int]:
        prompts, cut = encoder.encode_prompts(dialogues, max_prompt_length)
        # bf16 on a GPU (as training there), fp32 on a CPU
        with torch.autocast("cuda", torch.bfloat16, enabled=torch.cuda.is_available()):
            return sampler.sample(prompts, n=n, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed + chunk_no, batch_size=batch_size), cut

    return sample
