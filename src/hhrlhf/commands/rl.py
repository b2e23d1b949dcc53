"""`hhrlhf rl`: train a policy against a preference model (PPO or RLOO); `hhrlhf rl eval RUN`
(the paper's evaluation) comes from :mod:`hhrlhf.commands.rl_eval` when it is installed.

``hhrlhf rl POLICY PM [SOURCES...]`` is ``hhrlhf rl train POLICY PM [SOURCES...]``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

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
    """Steer a policy with a preference model: `hhrlhf rl POLICY PM [SOURCES]` trains (PPO or
    RLOO), `hhrlhf rl eval RUN` evaluates a run.

    \b
    Examples:
      hhrlhf rl runs/sft/model runs/pm/model harmless-base/test --algo rloo --out runs/rloo
      hhrlhf rl runs/sft/model runs/pm/model --prompts redteam --algo ppo --out runs/ppo
      hhrlhf rl --out runs/rloo --resume
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf rl")


@rl.command("train")
@click.argument("args", nargs=-1, metavar="POLICY PM [SOURCES]...")
@click.option("--algo", type=click.Choice(["rloo", "ppo"]), help="rloo (default) or ppo.")
@click.option("--out", "out_dir", help="Run folder (checkpoints, metrics, model).")
@click.option("--prompts", type=click.Choice(["records", "redteam"]),
              help="records: each row's dialogue up to its final Assistant turn (default); "
                   "redteam: the red-team transcripts' opening human turns.")
@click.option("--chat-format", type=click.Choice(["auto", "hh", "template"]),
              help="auto (default): the policy's own chat template, the HH text format when it "
                   "has none; hh: the HH text format always.")
@click.option("--n", "--k", "samples_per_prompt", type=int,
              help="Samples per prompt (default 4; --k: its earlier name).")
@click.option("--batch-size", type=int, help="Prompts per step (default 16).")
@click.option("--max-steps", type=int, help="Steps (default: one pass over the prompts).")
@click.option("--max-new-tokens", type=int, help="Tokens per response (default 64).")
@click.option("--kl-coef", type=float, help="KL penalty coefficient (default 0.05).")
@click.option("--lr", type=float, help="Learning rate (default 1e-6).")
@click.option("--temperature", type=float, help="Sampling temperature (default 1.0).")
@click.option("--top-p", type=float, help="Nucleus mass (default 1.0: off).")
@click.option("--top-k", type=int, help="Top-k (default 0: off).")
@click.option("--seed", type=click.IntRange(0), help="Seeds prompts, sampling, updates (default 0).")
@click.option("--threads", type=click.IntRange(0), help="torch CPU threads (default 0: torch's).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML, TOML or JSON file of configuration keys.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Set any configuration key (repeatable), e.g. --set kl_target=6.")
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train(args: tuple[str, ...], config_file: str | None, assignments: tuple[str, ...],
          resume: bool, quiet: bool, **options: Any) -> None:
    """Train POLICY (a causal LM folder) against the preference model PM on the prompts of
    SOURCES (subsets or files; default: the four preference subsets' train splits, or with
    --prompts redteam the red-team attempts), by RLOO or PPO with a KL penalty to POLICY.

    One line per step goes to RUN/metrics.jsonl: reward_mean, kl, entropy, response_len,
    clip_frac, value_loss (ppo), kl_coef, prompts_per_s.
    """
    from hhrlhf.outputs import run_inputs
    from hhrlhf.pm.base import model_kind
    from hhrlhf.pm.config import parse_assignments, resolve_backbone
    from hhrlhf.rl.train import RLConfig
    from hhrlhf.runs import check_run_folder, resolve_config

    explicit: dict[str, Any] = {}
    if len(args) == 1:
        raise click.UsageError("give POLICY and PM (or neither, with --resume)")
    if args:
        explicit.update(policy=args[0], pm=args[1])
        if args[2:]:
            explicit["data"] = list(args[2:])
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
        lines.append(f"note: {m['context_cut_prompts']:,} of {m['prompts']:,} prompts were "
                     f"longer than max_length - max_new_tokens = "
                     f"{config.max_length - config.max_new_tokens} tokens and lost their start")
    if m["shared_prompt_off"]:
        lines.append(f"note: shared-prompt packing is off, {m['shared_prompt_off']}: each "
                     "sample is computed as a full row")
    if config.out_dir:
        lines.append(f"policy: {Path(config.out_dir) / 'model'}  "
                     f"metrics: {Path(config.out_dir) / 'metrics.jsonl'}")
    click.echo("\n".join(lines))
