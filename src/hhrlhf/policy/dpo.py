"""Direct preference optimisation on the comparisons.

With ``m = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)]`` (summed over
each response's tokens, its EOS included):

- ``loss=sigmoid`` (DPO): ``-(1 - eps) * logsigmoid(beta * m) - eps * logsigmoid(-beta * m)``;
  ``eps = label_smoothing`` (conservative DPO; 0 = plain DPO);
- ``loss=ipo`` (IPO): ``(m' - 1 / (2 * beta))**2``, where ``m'`` uses per-token means of the
  log-ratios instead of sums (as TRL, which confirmed it with the IPO authors).

The implicit reward of a response is ``beta * (log pi - log ref)``; metrics per step and on the
held-out pairs: loss, reward accuracy (chosen reward above rejected by more than a tie,
:func:`correct_pairs`), the chosen and rejected
rewards, their margin, and (held-out) the policy's KL to the reference on held-out prompts,
estimated from samples of the policy: ``mean over samples of sum_t log pi(y_t) - log ref(y_t)``.

The reference is the starting policy (or ``reference``), frozen. With
``precompute_reference`` (default) its log-probs are computed once before training and the
reference takes no compute afterwards. Both policy and reference read each pair as one packed
row ``[prompt, chosen, rejected]`` where the family packs exactly (:mod:`hhrlhf.packing`), else
as two full rows. Rows whose two contexts differ are left out and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison
from hhrlhf.registry import PREFERENCE_TRAIN
from hhrlhf.runs import RunConfig, RunResult

LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(RunConfig):
    data: list[str] = field(default_factory=lambda: list(PREFERENCE_TRAIN))  # training sources (default: the four subsets' train splits)
    # identical responses carry no preference (their DPO gradient is zero)
    skip_flags: list[str] = field(default_factory=lambda: ["identical_responses"])
    policy: str = ""  # the starting policy (a causal LM folder), e.g. an SFT run's model/
    reference: str = ""  # "" = the starting policy
    chat_format: str = "auto"  # auto | hh | template: how dialogues become the policy's text
    beta: float = 0.1  # strength of the KL tie to the reference (DPO's beta)
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    label_smoothing: float = 0.0  # conservative DPO: the share of flipped labels assumed, in [0, 0.5)
    precompute_reference: bool = True  # reference log-probs computed once before training
    kl_prompts: int = 32  # held-out prompts sampled for the KL to the reference (0 = none)
    kl_max_new_tokens: int = 64  # tokens sampled per prompt for the KL estimate
    lr: float = 1e-6
    out_dir: str = "runs/dpo"

    def validate(self) -> DPOConfig:
        super().validate()
        from hhrlhf.policy.chat import check_chat_format_option
        from hhrlhf.records import ROW_CHECKS

        check_chat_format_option(self.chat_format)
        if not self.policy:
            raise HHRLHFError("config policy: DPO needs a starting policy (--policy DIR, e.g. "
                              "an `hhrlhf sft` run's model folder)")
        if self.loss not in LOSSES:
            raise HHRLHFError(f"config loss={self.loss!r}: must be one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            raise HHRLHFError(f"config beta={self.beta}: must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise HHRLHFError(f"config label_smoothing={self.label_smoothing}: must be in "
                              "[0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise HHRLHFError("config label_smoothing applies to loss=sigmoid only")
        if self.kl_prompts < 0 or self.kl_max_new_tokens < 1:
            raise HHRLHFError("config kl_prompts must be 0 or more, kl_max_new_tokens at least 1")
        unknown = [f for f in self.skip_flags if f not in ROW_CHECKS]
        if unknown:
            raise HHRLHFError(f"config skip_flags: unknown flag(s) {', '.join(unknown)}")
        if not self.data:
            raise HHRLHFError("config data: no training data named")
        return self


def dpo_loss(policy_lp: torch.Tensor, ref_lp: torch.Tensor, counts: torch.Tensor, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit rewards (chosen, rejected) from (B, 2) summed log-probs."""
    ratio = policy_lp - ref_lp
    rewards = beta * ratio.detach()
    if loss == "ipo":
        mean = ratio / counts.clamp(min=1)
        per_pair = (mean[:, 0] - mean[:, 1] - 1 / (2 * beta)) ** 2
    else:
        m = beta * (ratio[:, 0] - ratio[:, 1])
        per_pair = (-(1 - label_smoothing) * F.logsigmoid(m)
                    - label_smoothing * F.logsigmoid(-m))
    return per_pair, rewards[:, 0], rewards[:, 1]


# A pair counts as correct only when its reward margin clears this share of the size of its
# two log-prob sums: a policy equal to its reference gives margins of ~1e-6 (float rounding
# between the precomputed reference pass and the training pass), which are ties, not wins.
TIE_TOLERANCE = 1e-5


def correct_pairs(policy_lp: torch.Tensor, reward_chosen: torch.Tensor,
                  reward_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Pairs whose chosen reward beats the rejected one by more than a tie: the margin
    ``beta * [(log pi - log ref)_c - (log pi - log ref)_r]`` above
    ``beta * TIE_TOLERANCE * (|log pi(y_c)| + |log pi(y_r)|)``. Ties count as not correct, so
    the reward accuracy of a policy equal to its reference is 0."""
    size = policy_lp.detach().abs().sum(-1)
    return (reward_chosen - reward_rejected) > beta * TIE_TOLERANCE * size


def reference_logprobs(net: Any, rows: Any, packed: bool, pad_id: int, batch_size: int,
                       device: torch.device, autocast: Any = None, progress: bool = False,
                       desc: str = "reference") -> np.ndarray:
    """(pairs, 2) summed log-probs of chosen and rejected under ``net`` (no gradient), in
    the precision training runs in (``autocast``: the accelerator's), so that at the first step
    the policy's log-probs equal these. ``progress``: a bar over the pairs (the pass takes
    about as long as an epoch of forward passes: it is not silent)."""
    import contextlib
    import sys

    from tqdm import tqdm

    from hhrlhf.packing import collate_full, collate_shared
    from hhrlhf.pm.encode import sorted_batches
    from hhrlhf.policy.logprobs import response_logprobs

    out = np.zeros((len(rows), 2), dtype=np.float64)
    lengths = rows.packed_lengths if packed else rows.full_lengths
    was = net.training
    net.eval()
    bar = tqdm(total=len(rows), desc=desc, unit="pair", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with bar, torch.inference_mode(), (autocast or contextlib.nullcontext)():
        for idx in sorted_batches(lengths, batch_size):
            batch = (collate_shared if packed else collate_full)([rows.row(i) for i in idx],
                                                                 pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            lp, _ = response_logprobs(net, batch, 2)
            out[idx] = lp.double().cpu().numpy()
            bar.update(len(idx))
    net.train(was)
    return out


def train_dpo(config: DPOConfig, rows: list[Comparison] | None = None, *,
              eval_rows: list[Comparison] | None = None, resume: bool = False) -> RunResult:
    """DPO from ``config.policy`` on ``rows`` (or ``config.data``)."""
    import copy

    from hhrlhf.folds import split_rows
    from hhrlhf.packing import collate_full, collate_shared, packing_problem
    from hhrlhf.pm.encode import length_grouped_batches, sorted_batches
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.logprobs import LogprobNet, per_response
    from hhrlhf.policy.model import Policy
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
    # every row is read: flagged ones are left out (and counted) by the encoder
    train_rows, held = split_rows(config, config.data, rows, eval_rows)
    policy = Policy.load(config.policy, config.attn_implementation,
                         chat_format=config.chat_format)
    policy.check_length(config.max_length)
    # the reference reads the policy's token ids: its own tokenizer's format is not used
    ref_net = (Policy.load(config.reference, config.attn_implementation, chat_format=None).net
               if config.reference else copy.deepcopy(policy.net))
    ref_net.requires_grad_(False).eval()
    dev = accelerator.device
    policy.net.to(dev)
    ref_net.to(dev)
    encoder = PolicyEncoder(policy.tokenizer, config.max_length)
    data = encoder.encode_pairs(train_rows, config.skip_flags)
    held_data = encoder.encode_pairs(held, config.skip_flags) if held else None
    if not len(data):
        raise HHRLHFError("no training pairs left (all left out or none given)")
    problem = packing_problem(policy.config, config.max_length)
    packed = problem is None
    collate_rows = collate_shared if packed else collate_full
    lengths = data.packed_lengths if packed else data.full_lengths
    ref_train = ref_held = None
    if config.precompute_reference:
        show = config.progress and accelerator.is_main_process
        ref_train = reference_logprobs(ref_net, data, packed, policy.pad_id,
                                       config.eval_batch_size, dev, accelerator.autocast, show,
                                       "reference log-probs")
        if held_data is not None:
            ref_held = reference_logprobs(ref_net, held_data, packed, policy.pad_id,
                                          config.eval_batch_size, dev, accelerator.autocast,
                                          show, "reference log-probs, held out")
    out = prepare_run_folder(config, resume, accelerator.is_main_process)
    module = LogprobNet(policy.net)
    ref_module = LogprobNet(ref_net)

    def collate(idx: list[int], rows_: Any = data, ref: np.ndarray | None = ref_train
                ) -> dict[str, Any]:
        batch = collate_rows([rows_.row(i) for i in idx], policy.pad_id)
        if ref is not None:
            batch["ref"] = torch.from_numpy(ref[idx])
        return batch

    def pair_terms(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Per-pair loss, rewards (chosen, rejected) and whether the pair is correct."""
        lp, counts = per_response(model(batch), batch, 2)
        if "ref" in batch:
            ref = batch["ref"].to(lp.dtype)
        else:
            with torch.no_grad():
                ref = per_response(ref_module(batch), batch, 2)[0]
        per_pair, rc, rr = dpo_loss(lp.float(), ref.float(), counts.float(), config.beta,
                                    config.loss, config.label_smoothing)
        return per_pair, rc, rr, correct_pairs(lp.float(), rc, rr, config.beta)

    def loss(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, tuple[float, float]]]:
        per_pair, rc, rr, correct = pair_terms(model, batch)
        n = float(len(per_pair))
        return per_pair.mean(), {
            "loss": (float(per_pair.detach().sum()), n),
            "accuracy": (float(correct.sum()), n),
            "reward_chosen": (float(rc.sum()), n), "reward_rejected": (float(rr.sum()), n),
            "margin": (float((rc - rr).sum()), n), "pairs": (n, 1.0)}

    def evaluate(model: Any) -> dict[str, float]:
        assert held_data is not None
        share, weight = eval_share(len(held_data), accelerator)
        sums = np.zeros(6)
        was = model.training
        model.eval()
        held_lengths = held_data.packed_lengths if packed else held_data.full_lengths
        with torch.no_grad():
            for idx in sorted_batches(held_lengths[share], config.eval_batch_size):
                rows_ = [int(share[i]) for i in idx]
                batch = collate(rows_, held_data, ref_held)
                batch = {k: v.to(dev) for k, v in batch.items()}
                w = torch.from_numpy(weight[idx]).to(dev)
                with accelerator.autocast():
                    per_pair, rc, rr, correct = pair_terms(model, batch)
                sums += [float((per_pair * w).sum()), float((correct * w).sum()),
                         float((rc * w).sum()), float((rr * w).sum()),
                         float(((rc - rr) * w).sum()), float(w.sum())]
        model.train(was)
        s = reduce_sums(list(sums), accelerator)
        n = max(s[5], 1.0)
        result = {"eval_loss": s[0] / n, "eval_accuracy": s[1] / n,
                  "eval_reward_chosen": s[2] / n, "eval_reward_rejected": s[3] / n,
                  "eval_margin": s[4] / n, "eval_pairs": int(s[5])}
        if config.kl_prompts:
            result["eval_kl"] = sampled_kl(accelerator.unwrap_model(model).net, ref_net,
                                           policy, [c.chosen_dialogue for c in
                                                    held[: config.kl_prompts]], config)
        return result

    start = str(Path(config.reference or config.policy).resolve()) if Path(
        config.reference or config.policy).exists() else (config.reference or config.policy)

    def save(path: Path, state: dict[str, Any] | None) -> None:
        if state is not None:
            state = inner_state(state)
        policy.save(path, state)
        # the implicit reward beta * log(pi / ref) is a preference model (`hhrlhf pm eval`)
        from hhrlhf.pm.base import write_marker

        write_marker(path, "dpo", reference=start, beta=config.beta,
                     max_length=config.max_length)

    task = Task(module=module, size=len(data),
                batches=lambda epoch: length_grouped_batches(
                    lengths, config.batch_size, config.seed, epoch, config.group_by_length),
                collate=collate, loss=loss, save=save,
                evaluate=evaluate if held_data is not None and len(held_data) else None,
                throughput="pairs", name="dpo")
    result = run(config, task, accelerator, out, resume)
    window = final_window(result.history, "loss")
    left_out = dict(data.left_out)
    result.metrics.update({
        "train_pairs": len(data), "left_out": left_out,
        "eval_rows": len(held),
        "train_loss": float(np.mean([r["loss"] for r in window])) if window else None,
        "train_accuracy": float(np.mean([r["accuracy"] for r in window])) if window else None,
        "final_window": len(window),
        "first_step_loss": next((r["loss"] for r in result.history if "loss" in r), None),
        "shared_prompt": packed, "shared_prompt_off": problem,
        "tokens_saved": float(1 - data.packed_lengths.sum() / data.full_lengths.sum())
        if packed else 0.0,
        "truncated_responses": data.truncated_response, "context_cut_pairs": data.context_cut,
    })
    finish(out, result.metrics)
    policy.net = result.module.net
    result.module = policy
    return result


def sampled_kl(net: Any, ref_net: Any, policy: Any, dialogues: list[Any], config: DPOConfig
               ) -> float:
    """KL(policy || reference) on held-out prompts: one sample of the policy per prompt,
    ``mean of sum_t [log pi(y_t) - log ref(y_t)]`` over the samples."""
    from hhrlhf.packing import collate_full
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.logprobs import response_logprobs
    from hhrlhf.policy.sample import Sampler

    encoder = PolicyEncoder(policy.tokenizer, config.max_length)
    prompts, _ = encoder.encode_prompts(dialogues, config.max_length - config.kl_max_new_tokens)
    sampler = Sampler(net, policy.tokenizer)
    samples = sampler.sample(prompts, n=1, max_new_tokens=config.kl_max_new_tokens,
                             temperature=1.0, seed=config.seed)
    rows = [(p, [np.asarray(s.tokens, dtype=np.int64)]) for p, s in zip(prompts, samples)
            if len(s.tokens)]
    if not rows:
        return 0.0
    dev = next(net.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(rows), config.eval_batch_size):
            batch = collate_full(rows[i: i + config.eval_batch_size], policy.pad_id)
            batch = {k: v.to(dev) for k, v in batch.items()}
            lp, _ = response_logprobs(net, batch, 1)
            lr_, _ = response_logprobs(ref_net, batch, 1)
            total += float((lp - lr_).sum())
    return total / len(rows)


def read_marker(folder: Path) -> dict[str, Any]:
    from hhrlhf.pm.base import MARKER_FILE

    return json.loads((folder / MARKER_FILE).read_text())  # type: ignore[no-any-return]
