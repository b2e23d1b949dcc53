"""`hhrlhf rl`: train a policy against a preference model (PPO or RLOO); `hhrlhf rl eval RUN`
(the paper's evaluation) comes from :mod:`hhrlhf.commands.rl_eval` when it is installed.

``hhrlhf rl [OPTIONS] [SOURCES...]`` is ``hhrlhf rl train [OPTIONS] [SOURCES...]``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import (
    ModelCommand,
    alias_option,
    chat_format_option,
    config_options,
    cut_note,
    from_config,
    given,
    max_prompts_option,
    out_dir_option,
    pm_option,
    policy_option,
    quiet_option,
    require_models,
    sampling_options,
    threads_option,
)

CONFIG = "hhrlhf.rl.train:RLConfig"
EVAL_MODULE = "hhrlhf.commands.rl_eval"


class RLGroup(click.Group):
    """``train`` is the default subcommand; ``eval`` is imported only when it runs (and only
    listed once its module exists)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["train"] + (["eval"] if self.get_command(ctx, "eval") is not None else [])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "eval":
            try:
                module = importlib.import_module(EVAL_MODULE)
            except ModuleNotFoundError as e:
                if e.name != EVAL_MODULE:
                    raise
                return None
            cmd = module.rl_eval
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in ("eval", "train", "--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group("rl", cls=RLGroup, invoke_without_command=False)
def rl() -> None:
    """Steer a policy with a preference model: `hhrlhf rl train` trains it (RLOO or PPO, with
    a KL penalty to the starting policy), `hhrlhf rl eval RUN` evaluates the run (reward
    against sqrt(KL), win rates and Elo against the starting policy). `hhrlhf rl ...` without
    a subcommand is `hhrlhf rl train ...`.

    \b
    Examples:
      hhrlhf rl train --policy runs/sft/model --pm runs/pm/model harmless-base/train \\
          --algo rloo --max-steps 200 --out runs/rloo
      hhrlhf rl train --policy runs/sft/model --pm runs/pm/model --prompts redteam \\
          --algo ppo --out runs/ppo
      hhrlhf rl train --out runs/rloo --resume
      hhrlhf rl eval runs/rloo --prompts harmless-base/test --heldout-pm runs/pm-b/model \\
          --plot reward_kl.png
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf rl")


@rl.command("train", cls=ModelCommand)
@policy_option("The initial policy (a causal LM folder), e.g. runs/sft/model; the KL penalty "
               "ties the trained policy to it.", required=False)
@pm_option(required=False)
@click.argument("sources", nargs=-1, metavar="[SOURCES]...")
@click.option("--algo", type=click.Choice(["rloo", "ppo"]), help="The algorithm.",
              **from_config(CONFIG, "algo"))
@out_dir_option()
@click.option("--prompts", type=click.Choice(["records", "redteam"]),
              help="records: each row's dialogue up to its final Assistant turn; "
                   "redteam: the red-team transcripts' opening human turns.",
              **from_config(CONFIG, "prompts"))
@max_prompts_option(config=CONFIG)
@chat_format_option(CONFIG)
@click.option("--n", "samples_per_prompt", type=int, help="Samples per prompt.",
              **from_config(CONFIG, "samples_per_prompt"))
@alias_option("--k", "samples_per_prompt_alias", type=int)  # --n's earlier name
@click.option("--batch-size", type=int, help="Prompts per step.",
              **from_config(CONFIG, "batch_size"))
@click.option("--max-steps", type=int, help="Steps (0: one pass over the prompts).",
              **from_config(CONFIG, "max_steps"))
@click.option("--kl-coef", type=float, help="KL penalty coefficient.",
              **from_config(CONFIG, "kl_coef"))
@click.option("--lr", type=float, help="Learning rate.", **from_config(CONFIG, "lr"))
@sampling_options(config=CONFIG, keys=("temperature", "top_p", "top_k", "max_new_tokens"),
                  seed="Seeds prompts, sampling and updates.")
@threads_option(config=CONFIG)
@config_options(example="kl_target=6")
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@quiet_option()
def train(sources: tuple[str, ...], config_file: str | None, assignments: tuple[str, ...],
          resume: bool, quiet: bool, **options: Any) -> None:
    """Train the --policy against the preference model --pm on the prompts of SOURCES
    (subsets or files; default: the four preference subsets' train splits, or with --prompts
    redteam the red-team attempts), by RLOO or PPO with a KL penalty to the initial policy.

    One line per step goes to RUN/metrics.jsonl: reward_mean, kl, entropy, response_len,
    clip_frac, value_loss (ppo), kl_coef, prompts_per_s.

    \b
    Examples:
      hhrlhf rl train --policy runs/sft/model --pm runs/pm/model harmless-base/train \\
          --algo rloo --max-steps 200 --out runs/rloo
      hhrlhf rl train --out runs/rloo --resume
    """
    from hhrlhf.outputs import run_inputs
    from hhrlhf.pm.base import model_kind
    from hhrlhf.pm.config import parse_assignments, resolve_backbone
    from hhrlhf.rl.train import RLConfig
    from hhrlhf.runs import check_run_folder, resolve_config

    if not resume:
        require_models(click.get_current_context(), policy=options["policy"],
                       pm=options["pm"])
    options["samples_per_prompt"] = given(options["samples_per_prompt"],
                                          options.pop("samples_per_prompt_alias"))
    explicit: dict[str, Any] = {}
    if sources:
        explicit["data"] = list(sources)
    explicit.update({key: v for key, v in options.items() if v is not None})
    if quiet:
        explicit["progress"] = False
    explicit.update(parse_assignments(assignments))
    config = resolve_config(RLConfig, config_file, explicit, resume)
    check_run_folder(config.out_dir, resume, run_inputs(config))
    resolve_backbone(config.policy)
    model_kind(config.pm)
    from hhrlhf.read import resolve
    from hhrlhf.rl.prompts import default_sources

    resolve(config.data or default_sources(config.prompts))

    from hhrlhf.rl.train import train_rl

    m = train_rl(config, resume=resume).metrics
    if not m.get("main_process", True):
        return
    lines = [f"{m['algo']}: {m['steps']:,} steps on {m['prompts']:,} prompts, "
             f"{m['samples_per_prompt']} samples each"
             + (f", {m['prompts_per_s']:.2f} prompts/s ({m['rollouts_per_s']:.2f} rollouts/s)"
                if m["prompts_per_s"] else "")]
    if m["final_reward"] is not None:
        lines.append(f"PM reward {m['first_reward']:.4f} at step 1, {m['final_reward']:.4f} "
                     f"(mean of the last {m['final_window']} steps); KL to the initial policy "
                     f"{m['final_kl']:.3f} nats (the mean over the same steps of each step's "
                     "sample estimate, which can be negative)")
    if m.get("context_cut_prompts"):  # nothing is cut without a word
        lines.append(cut_note(m["context_cut_prompts"], m["prompts"],
                              f"max_length - max_new_tokens = "
                              f"{config.max_length - config.max_new_tokens} tokens"))
    if m["shared_prompt_off"]:
        lines.append(f"note: shared-prompt packing is off, {m['shared_prompt_off']}: each "
                     "sample is computed as a full row")
    if config.out_dir:
        lines.append(f"policy: {Path(config.out_dir) / 'model'}  "
                     f"metrics: {Path(config.out_dir) / 'metrics.jsonl'}")
    click.echo("\n".join(lines))
