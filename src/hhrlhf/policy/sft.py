"""Supervised fine-tuning on chosen dialogues: the loss on Assistant tokens only.

    loss = - mean over the batch's assistant tokens of log p(token | dialogue before it)

Each chosen dialogue is one row (keep-end truncation, :mod:`hhrlhf.policy.encode`); rows are
batched by length (length-grouped batches: exact, little padding) and the vocabulary projection
runs only where an assistant token is predicted. The run folder, checkpoints, resume,
accelerate and progress are :mod:`hhrlhf.runs`'. Held-out loss and perplexity on
``eval_data`` or on one of ``holdout_folds`` folds of the rows grouped by prompt.

The dataset card warns that training a dialogue agent directly on these data is likely to make
a harmful model: the default data are the helpful subsets' chosen dialogues.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison
from hhrlhf.runs import RunConfig, RunResult

HELPFUL_TRAIN = ["helpful-base/train", "helpful-rejection-sampled/train", "helpful-online/train"]
CARD_WARNING = ("the dataset card warns that training a dialogue agent directly on these data "
                "is likely to make a harmful model")



@dataclass
class SFTConfig(RunConfig):
    data: list[str] = field(default_factory=lambda: list(HELPFUL_TRAIN))  # training sources (default: the helpful subsets' train splits)
    skip_flags: list[str] = field(default_factory=lambda: ["empty_response"])  # rows with these audit flags are left out
    policy: str = ""  # the starting policy: a causal LM folder (or hub id)
    init: str = ""  # "tiny": build a tiny Llama-shaped policy from the training dialogues
    chat_format: str = "auto"  # auto | hh | template: how dialogues become the policy's text
    tiny_vocab_size: int = 4096  # --init tiny: BPE vocabulary trained on the data
    tiny_hidden_size: int = 128  # --init tiny: hidden size of the decoder
    tiny_layers: int = 4  # --init tiny: decoder layers
    tiny_heads: int = 4  # --init tiny: attention heads
    lr: float = 2e-5
    out_dir: str = "runs/sft"

    def validate(self) -> SFTConfig:
        super().validate()
        from hhrlhf.policy.chat import check_chat_format_option
        from hhrlhf.records import ROW_CHECKS

        check_chat_format_option(self.chat_format)
        if bool(self.policy) == bool(self.init):
            raise HHRLHFError("config: give exactly one of policy (a causal LM folder) and "
                              "init=tiny")
        if self.init not in ("", "tiny"):
            raise HHRLHFError(f"config init={self.init!r}: must be tiny (or give policy)")
        unknown = [f for f in self.skip_flags if f not in ROW_CHECKS]
        if unknown:
            raise HHRLHFError(f"config skip_flags: unknown flag(s) {', '.join(unknown)}")
        for key in ("tiny_vocab_size", "tiny_hidden_size", "tiny_layers", "tiny_heads"):
            if getattr(self, key) < 1:
                raise HHRLHFError(f"config {key}={getattr(self, key)}: must be at least 1")
        if self.tiny_hidden_size % self.tiny_heads:
            raise HHRLHFError("config tiny_hidden_size must be a multiple of tiny_heads")
        if not self.data:
            raise HHRLHFError("config data: no training data named")
        return self


def start_policy(config: SFTConfig, texts: list[str], out: Path | None) -> Any:
    """The starting policy: loaded, or (init=tiny) built from ``texts``; a resumed run reloads
    the one it built (``out/init``)."""
    from hhrlhf.policy.model import Policy, TinyConfig, init_tiny

    if config.policy:
        return Policy.load(config.policy, config.attn_implementation,
                           chat_format=config.chat_format)
    if out is not None and (out / "init" / "config.json").is_file():
        return Policy.load(out / "init", config.attn_implementation)
    heads = config.tiny_heads
    tiny = TinyConfig(vocab_size=config.tiny_vocab_size, hidden_size=config.tiny_hidden_size,
                      intermediate_size=3 * config.tiny_hidden_size,
                      num_hidden_layers=config.tiny_layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=max(1024, config.max_length), seed=config.seed)
    tmp = Path(tempfile.mkdtemp(prefix="hhrlhf-init-"))
    try:
        return init_tiny(texts, tmp / "init", tiny)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_sft(config: SFTConfig, rows: list[Comparison] | None = None, *,
              eval_rows: list[Comparison] | None = None, resume: bool = False) -> RunResult:
    """SFT on the chosen dialogues of ``rows`` (or of ``config.data``)."""
    import torch

    from hhrlhf.folds import filter_rows, split_rows
    from hhrlhf.pm.encode import length_grouped_batches, sorted_batches
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.logprobs import LogprobNet, collate_sft
    from hhrlhf.runs import (
        Task,
        eval_share,
        final_window,
        finish,
        inner_state,
        prepare_run_folder,
        reduce_sums,
        run,
        start_run,
    )

    config, accelerator = start_run(config)
    # Split first, then drop flagged rows: the held-out fold is the same one `hhrlhf dpo`
    # holds out from the same data (its prompts never trained on by either).
    train_rows, held = split_rows(config, config.data, rows, eval_rows)
    train_rows, skipped = filter_rows(train_rows, config.skip_flags, 0)
    held, held_skipped = filter_rows(held, config.skip_flags, 0)
    skipped += held_skipped
    if not train_rows:
        raise HHRLHFError("no training rows left (all skipped or none given)")
    out = Path(config.out_dir) if config.out_dir else None
    policy = start_policy(config, [c.chosen_raw for c in train_rows], out)
    policy.check_length(config.max_length)
    policy.net.to(accelerator.device)
    encoder = PolicyEncoder(policy.tokenizer, config.max_length)
    data = encoder.encode_sft([c.chosen_dialogue for c in train_rows])
    held_data = encoder.encode_sft([c.chosen_dialogue for c in held]) if held else None
    # The run folder appears once data and model have loaded: a bad row or model leaves none.
    out = prepare_run_folder(config, resume, accelerator.is_main_process)
    if out is not None and config.init and accelerator.is_main_process and not (
            out / "init").exists():
        policy.save(out / "init")  # what a resumed run and `hhrlhf dpo` start from
    lengths = data.lengths
    module = LogprobNet(policy.net)

    def collate(idx: list[int]) -> dict[str, Any]:
        return collate_sft([data.ids[i] for i in idx], [data.loss[i] for i in idx],
                           policy.pad_id)

    def loss(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, tuple[float, float]]]:
        lp = model(batch)
        n = float(lp.numel())
        return -lp.mean(), {"loss": (-float(lp.detach().sum()), n),
                            "tokens": (float(batch["attention_mask"].sum()), 1.0),
                            "loss_tokens": (n, 1.0)}

    def evaluate(model: Any) -> dict[str, float]:
        assert held_data is not None
        share, weight = eval_share(len(held_data), accelerator)
        total = count = 0.0
        was = model.training
        model.eval()
        with torch.no_grad():
            for idx in sorted_batches(held_data.lengths[share], config.eval_batch_size):
                rows_ = [int(share[i]) for i in idx]
                w = torch.from_numpy(weight[idx]).to(accelerator.device)
                batch = collate_sft([held_data.ids[i] for i in rows_],
                                    [held_data.loss[i] for i in rows_], policy.pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    lp = model(batch).double()
                tw = w[batch["tok_owner"]]
                total += float(-(lp * tw).sum())
                count += float(tw.sum())
        model.train(was)
        total, count = reduce_sums([total, count], accelerator)
        mean = total / max(count, 1.0)
        return {"eval_loss": mean, "eval_perplexity": float(np.exp(mean)),
                "eval_tokens": int(count)}

    def save(path: Path, state: dict[str, Any] | None) -> None:
        if state is not None:
            state = inner_state(state)
        policy.save(path, state)

    task = Task(module=module, size=len(data),
                batches=lambda epoch: length_grouped_batches(
                    lengths, config.batch_size, config.seed, epoch, config.group_by_length),
                collate=collate, loss=loss, save=save,
                evaluate=evaluate if held_data is not None else None,
                throughput="tokens", name="sft")
    result = run(config, task, accelerator, out, resume)
    window = final_window(result.history, "loss")
    result.metrics.update({
        "train_rows": len(data), "skipped_rows": skipped, "eval_rows": len(held),
        "train_loss": float(np.mean([r["loss"] for r in window])) if window else None,
        "final_window": len(window),
        "truncated_responses": data.truncated_response, "context_cut_rows": data.context_cut,
    })
    finish(out, result.metrics)
    policy.net = result.module.net
    result.module = policy
    return result


def start_note(config: SFTConfig) -> str:
    """The note ``hhrlhf sft`` starts with: the card's warning, and what data the defaults
    train on where the defaults are used."""
    default = config.data == SFTConfig().data
    return CARD_WARNING + ("; with no sources named, hhrlhf sft trains on the helpful subsets' "
                           "chosen dialogues" if default else "")
