"""``hhrlhf rl``: a policy trained against a preference model, by PPO or RLOO.

One step: ``batch_size`` prompts, ``k = samples_per_prompt`` samples each (one shared prefill
per prompt: :class:`hhrlhf.policy.sample.Sampler`), scored by the PM; the policy (with its
value head for PPO) and the frozen initial policy (the reference) read each prompt and its k
samples as one packed row ``[prompt, r1..rk]`` (:mod:`hhrlhf.packing`; full rows for a family
that does not pack exactly); then ``update_epochs`` passes of ``minibatches`` optimizer steps
over the batch.

RLOO (as TRL 1.16's ``RLOOTrainer``): reward ``R_i = PM_i - kl_coef * KL_i`` with ``KL_i`` the
sequence's summed per-token ``log pi_old - log ref`` (a sequence-level penalty in the reward);
advantage ``R_i - mean of the other k - 1 rewards of its prompt``; the loss is the clipped
surrogate on the sequence's summed log-prob ratio.

PPO (Ziegler et al. 2019, as the HH paper used it): per-token reward ``-kl_coef * (log pi_old
- log ref)`` at every token, plus the PM score (whitened over the batch when
``whiten_rewards``) at the last token; GAE(gamma, lambda) with a value head; advantages
whitened; clipped policy loss per token and clipped value loss. The KL coefficient is fixed or
adaptive (``kl_target`` > 0). The value head is a linear layer on the policy's final hidden
states: the one packed forward pass gives both log-probs and values, where a separate value
model would double the compute and memory of every update; ``vf_coef`` bounds how much the
value loss pulls on the shared trunk.

The run folder is the one every hhrlhf training run makes (:mod:`hhrlhf.runs`):
``config.json``, ``metrics.jsonl`` (one row per step), ``checkpoints/step-N/`` (atomic),
``model/`` (the final policy) and ``result.json``. Each step's prompts, sampling seed and
minibatch order are functions of (seed, step), so a run resumed after kill -9 ends with the
same metrics and weights as one never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Dialogue, response_turn
from hhrlhf.rl.prompts import PROMPT_KINDS
from hhrlhf.runs import RunConfig, RunResult, final_window, inner_state

ALGOS = ("rloo", "ppo")


@dataclass
class RLConfig(RunConfig):
    policy: str = ""  # the initial policy (a causal LM folder), e.g. an SFT run's model/
    chat_format: str = "auto"  # auto | hh | template: how dialogues become the policy's text
    pm: str = ""  # the preference model folder (hhrlhf pm train, lexical, dpo)
    data: list[str] = field(default_factory=list)  # prompt sources; [] = the default of `prompts`
    prompts: str = "records"  # "records": dialogues up to the final Assistant turn; "redteam"
    max_prompts: int = 0  # 0 = all distinct prompts
    algo: str = "rloo"
    batch_size: int = 16  # prompts per step
    samples_per_prompt: int = 4  # k
    max_new_tokens: int = 64
    max_length: int = 512  # prompt (end kept) + response
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.05
    kl_target: float = 0.0  # > 0: adaptive coefficient towards this KL per response (nats)
    kl_horizon: int = 10000
    update_epochs: int = 0  # passes over each rollout batch; 0 = 1 for rloo, 4 for ppo
    minibatches: int = 0  # optimizer steps per pass; 0 = 1 for rloo, 2 for ppo
    clip_range: float = 0.2
    whiten_advantages: bool = True
    # ppo only
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    vf_clip: float = 0.2
    whiten_rewards: bool = True
    rollout_batch_size: int = 64  # sequences decoded together
    forward_batch_size: int = 16  # packed rows per no-grad forward pass (policy, reference)
    ref_device: str = ""  # "" = the policy's device
    pm_device: str = ""  # "" = where the PM loads itself (neural PMs: the GPU when there is one)
    lr: float = 1e-6
    warmup_ratio: float = 0.0
    scheduler: str = "constant"
    max_steps: int = 0  # 0 = `epochs` passes over the prompts
    save_every: int = 50
    out_dir: str = "runs/rl"

    def validate(self) -> RLConfig:
        super().validate()
        from hhrlhf.policy.chat import check_chat_format_option

        check_chat_format_option(self.chat_format)
        if not self.policy:
            raise HHRLHFError("config policy: RL needs an initial policy (a causal LM folder, "
                              "e.g. an `hhrlhf sft` run's model folder)")
        if not self.pm:
            raise HHRLHFError("config pm: RL needs a preference model folder")
        if self.algo not in ALGOS:
            raise HHRLHFError(f"config algo={self.algo!r}: must be one of {', '.join(ALGOS)}")
        if self.prompts not in PROMPT_KINDS:
            raise HHRLHFError(f"config prompts={self.prompts!r}: must be one of "
                              f"{', '.join(PROMPT_KINDS)}")
        if self.samples_per_prompt < (2 if self.algo == "rloo" else 1):
            raise HHRLHFError(f"config samples_per_prompt={self.samples_per_prompt}: RLOO "
                              "needs at least 2 (the leave-one-out baseline)"
                              if self.algo == "rloo" else "must be at least 1")
        for key in ("max_new_tokens", "rollout_batch_size", "forward_batch_size", "kl_horizon"):
            if getattr(self, key) < 1:
                raise HHRLHFError(f"config {key}={getattr(self, key)}: must be at least 1")
        for key in ("max_prompts", "update_epochs", "minibatches", "top_k"):
            if getattr(self, key) < 0:
                raise HHRLHFError(f"config {key}={getattr(self, key)}: must be 0 or more")
        if self.max_new_tokens + 8 > self.max_length:
            raise HHRLHFError(f"config max_new_tokens={self.max_new_tokens}: leaves no room for "
                              f"a prompt within max_length={self.max_length}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise HHRLHFError("config temperature must be positive and top_p in (0, 1]")
        if self.kl_coef < 0 or self.kl_target < 0:
            raise HHRLHFError("config kl_coef and kl_target must be 0 or more")
        if not 0 < self.clip_range or not 0 < self.vf_clip:
            raise HHRLHFError("config clip_range and vf_clip must be positive")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise HHRLHFError("config gamma and lam must be in [0, 1]")
        return self

    @property
    def epochs_per_batch(self) -> int:
        return self.update_epochs or (4 if self.algo == "ppo" else 1)

    @property
    def minibatches_per_epoch(self) -> int:
        return min(self.minibatches or (2 if self.algo == "ppo" else 1), self.batch_size)


class ActorCritic(torch.nn.Module):
    """The policy's decoder and, for PPO, a scalar value head on its final hidden states."""

    def __init__(self, net: Any, value_head: bool):
        super().__init__()
        self.net = net
        self.value_head = torch.nn.Linear(net.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return token_outputs(self.net, batch, self.value_head)


def token_outputs(net: Any, batch: dict[str, torch.Tensor], value_head: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per flat response token: log-prob, entropy of the policy's distribution there, and the
    value of the state before it (PPO). The vocabulary projection runs at response positions
    only (:mod:`hhrlhf.policy.logprobs`)."""
    from hhrlhf.policy.logprobs import hidden_states, project

    h = hidden_states(net, batch)[batch["tok_row"], batch["tok_pred"]]
    logits = project(net, h).float()
    logsm = torch.log_softmax(logits, dim=-1)
    lp = logsm.gather(-1, batch["tok_target"][:, None])[:, 0]
    entropy = -(logsm.exp() * logsm).sum(-1)
    values = value_head(h).float()[:, 0] if value_head is not None else None
    return lp, entropy, values


@dataclass
class Rollout:
    """One step's samples and what the update needs, flat per token in packed order
    (prompt, sample, token) and per response (prompt * k + sample)."""

    rows: list[tuple[np.ndarray, list[np.ndarray]]]
    scores: np.ndarray  # PM score per response
    tok_start: np.ndarray  # per row: its first token in the flat arrays (len = rows + 1)
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    entropy: torch.Tensor
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # per token (ppo) or per response (rloo)
    returns: torch.Tensor | None = None  # per token (ppo)
    seq_kl: torch.Tensor | None = None
    stops: list[str] = field(default_factory=list)


def response_dialogue(prompt: Any, text: str) -> Any:
    """The prompt dialogue with the sampled response as its final Assistant turn."""
    return Dialogue(prompt.turns + (response_turn(text),), prompt.preamble)


def score_samples(pm: Any, prompts: list[Any], texts: list[str], k: int) -> np.ndarray:
    """PM scores of ``k`` responses per prompt (flat, prompt by prompt): by the PM's
    ``score_groups`` where it has one (a neural decoder PM packs a prompt's k responses in one
    row), else dialogue by dialogue."""
    groups = getattr(pm, "score_groups", None)
    if groups is not None:
        turns = [[response_turn(t) for t in texts[j * k: (j + 1) * k]]
                 for j in range(len(prompts))]
        return np.asarray(groups(prompts, turns), dtype=np.float64).reshape(-1)
    dialogues = [response_dialogue(prompts[j // k], t) for j, t in enumerate(texts)]
    return np.asarray(pm.score(dialogues), dtype=np.float64)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def train_rl(config: RLConfig, *, pm: Any = None, prompts: list[Any] | None = None,
             resume: bool = False) -> RunResult:
    """RL from ``config.policy`` against ``pm`` (or the PM folder ``config.pm``) on
    ``prompts`` (or those of ``config.data``)."""
    from tqdm import tqdm
    from transformers import get_scheduler

    import hhrlhf.pm
    from hhrlhf.packing import collate_full, collate_shared, packing_problem
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.sample import Sampler
    from hhrlhf.rl.advantages import AdaptiveKL, gae, leave_one_out, to_padded, whiten
    from hhrlhf.rl.losses import clipped_policy_loss, clipped_value_loss
    from hhrlhf.rl.prompts import default_sources, load_prompts
    from hhrlhf.runs import (
        finish,
        prepare_run_folder,
        reduce_sums,
        restore_checkpoint,
        start_run,
        write_checkpoint,
    )

    t_start = time.perf_counter()
    config, accelerator = start_run(config)
    if prompts is None:
        if not config.data:  # the run folder names the sources it read
            config = dataclasses.replace(config, data=default_sources(config.prompts))
        prompts = load_prompts(config.data, config.prompts, config.max_prompts)
    elif config.max_prompts:
        prompts = prompts[: config.max_prompts]
    policy = Policy.load(config.policy, config.attn_implementation,
                         chat_format=config.chat_format)
    if pm is None:
        pm = hhrlhf.pm.load(config.pm)
    if config.pm_device and hasattr(pm, "to"):
        pm.to(config.pm_device)
    dev = accelerator.device
    ref_dev = torch.device(config.ref_device) if config.ref_device else dev
    ref_net = copy.deepcopy(policy.net).requires_grad_(False).eval().to(ref_dev)
    encoder = PolicyEncoder(policy.tokenizer, config.max_length)
    prompt_ids, context_cut = encoder.encode_prompts(
        prompts, config.max_length - config.max_new_tokens)
    problem = packing_problem(policy.config, config.max_length)
    packed = problem is None
    collate_rows = collate_shared if packed else collate_full
    k = config.samples_per_prompt
    ppo = config.algo == "ppo"

    world, rank = accelerator.num_processes, accelerator.process_index
    n_prompts = len(prompt_ids)
    per_step = min(config.batch_size, n_prompts)
    steps_per_epoch = max(1, n_prompts // per_step)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    epochs_per_batch, n_mini = config.epochs_per_batch, config.minibatches_per_epoch

    module = ActorCritic(policy.net, value_head=ppo)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    optimizer_steps = total_steps * epochs_per_batch * n_mini
    scheduler = get_scheduler(config.scheduler, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * optimizer_steps),
                              num_training_steps=optimizer_steps)
    model, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    out = prepare_run_folder(config, resume, accelerator.is_main_process)
    kl_ctl = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
    step = 0
    history: list[dict[str, Any]] = []
    if resume and out is not None:
        state, history = restore_checkpoint(accelerator, out)
        if state is not None:
            step, kl_ctl.coef = state["step"], state["kl_coef"]
    metrics_file = (open(out / "metrics.jsonl", "a" if step else "w")  # noqa: SIM115
                    if (out is not None and accelerator.is_main_process) else None)

    def save(path: Path, state: dict[str, Any] | None) -> None:
        if state is not None:
            state = inner_state(state)
        policy.save(path, state)

    def prompts_of(s: int) -> list[int]:
        """The prompts of step ``s``: a slice of the epoch's permutation; this process's
        share of them."""
        epoch, at = divmod(s, steps_per_epoch)
        order = np.random.default_rng(_seed(config.seed, epoch)).permutation(n_prompts)
        chosen = order[at * per_step: (at + 1) * per_step]
        return [int(i) for i in chosen[rank::world]]

    unwrapped = accelerator.unwrap_model(model)
    sampler = Sampler(unwrapped.net, policy.tokenizer)

    def forward_no_grad(net: Any, rows: list[Any], device: torch.device, head: Any = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lps, ents, vals = [], [], []
        was = net.training
        net.eval()
        with torch.no_grad():
            for i in range(0, len(rows), config.forward_batch_size):
                batch = collate_rows(rows[i: i + config.forward_batch_size], policy.pad_id)
                batch = {key: v.to(device) for key, v in batch.items()}
                with accelerator.autocast():
                    lp, ent, val = token_outputs(net, batch, head)
                lps.append(lp.to(dev))
                ents.append(ent.to(dev))
                if val is not None:
                    vals.append(val.to(dev))
        net.train(was)
        return torch.cat(lps), torch.cat(ents), (torch.cat(vals) if vals else None)

    def rollout(s: int) -> Rollout:
        idx = prompts_of(s)
        samples = sampler.sample([prompt_ids[i] for i in idx], n=k,
                                 max_new_tokens=config.max_new_tokens,
                                 temperature=config.temperature, top_p=config.top_p,
                                 top_k=config.top_k, seed=_seed(config.seed, s, rank),
                                 batch_size=config.rollout_batch_size)
        scores = score_samples(pm, [prompts[i] for i in idx], [smp.text for smp in samples], k)
        rows = [(prompt_ids[i], [np.asarray(samples[j * k + m].tokens, dtype=np.int64)
                                 for m in range(k)]) for j, i in enumerate(idx)]
        lens = np.array([sum(len(r) for r in rs) for _, rs in rows])
        tok_start = np.concatenate([[0], np.cumsum(lens)])
        old_lp, entropy, old_v = forward_no_grad(unwrapped.net, rows, dev, unwrapped.value_head)
        ref_lp, _, _ = forward_no_grad(ref_net, rows, ref_dev)
        return Rollout(rows, scores, tok_start, old_lp, ref_lp, entropy, old_v,
                       stops=[smp.stop for smp in samples])

    def owners(ro: Rollout) -> torch.Tensor:
        counts = [len(r) for _, rs in ro.rows for r in rs]
        return torch.repeat_interleave(torch.arange(len(counts), device=dev),
                                       torch.tensor(counts, device=dev))

    def advantages(ro: Rollout) -> None:
        owner = owners(ro)
        n_resp = len(ro.rows) * k
        tok_kl = ro.old_logp - ro.ref_logp  # k1: the per-token penalty of Ziegler et al. / TRL
        ro.seq_kl = torch.zeros(n_resp, dtype=tok_kl.dtype, device=dev).index_add_(
            0, owner, tok_kl)
        scores = torch.as_tensor(ro.scores, dtype=torch.float32, device=dev)
        coef = kl_ctl.coef
        if not ppo:
            rewards = scores - coef * ro.seq_kl
            adv, _ = leave_one_out(rewards.view(-1, k))
            adv = adv.reshape(-1)
            ro.advantages = whiten(adv) if config.whiten_advantages and len(adv) > 1 else adv
            return
        assert ro.old_values is not None
        if config.whiten_rewards and len(scores) > 1:
            scores = whiten(scores)
        tok_r, mask = to_padded(-coef * tok_kl, owner, n_resp)
        last = mask.sum(1) - 1
        tok_r[torch.arange(n_resp, device=dev), last] += scores
        values, _ = to_padded(ro.old_values, owner, n_resp)
        adv, ret = gae(tok_r, values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            adv = whiten(adv, mask)
        ro.advantages, ro.returns = adv[mask], ret[mask]

    def update(ro: Rollout, s: int) -> dict[str, tuple[float, float]]:
        sums: dict[str, list[float]] = {}

        def add(name: str, value: float, count: float = 1.0) -> None:
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += value * count
            acc[1] += count

        assert ro.advantages is not None
        n_rows = len(ro.rows)
        for epoch in range(epochs_per_batch):
            order = np.random.default_rng(_seed(config.seed, s, rank, epoch)).permutation(n_rows)
            for part in np.array_split(order, min(n_mini, n_rows)):
                part = np.sort(part)  # rows in rollout order: their tokens then stay in order
                batch = collate_rows([ro.rows[i] for i in part], policy.pad_id)
                batch = {key: v.to(dev) for key, v in batch.items()}
                tok = torch.from_numpy(np.concatenate(
                    [np.arange(ro.tok_start[i], ro.tok_start[i + 1]) for i in part])).to(dev)
                resp = torch.from_numpy(np.concatenate(
                    [np.arange(i * k, (i + 1) * k) for i in part])).to(dev)
                with accelerator.autocast():
                    lp, _, values = model(batch)
                old = ro.old_logp[tok]
                if ppo:
                    assert ro.returns is not None and ro.old_values is not None
                    assert values is not None
                    pg, clip_frac = clipped_policy_loss(lp, old, ro.advantages[tok],
                                                        config.clip_range)
                    vloss, vclip = clipped_value_loss(values, ro.old_values[tok],
                                                      ro.returns[tok], config.vf_clip)
                    loss = pg + config.vf_coef * vloss
                    add("value_loss", float(vloss.detach()), len(tok))
                    add("value_clip_frac", float(vclip), len(tok))
                    add("clip_frac", float(clip_frac), len(tok))
                else:
                    owner = batch["tok_owner"]
                    n_resp = len(part) * k
                    seq_lp = torch.zeros(n_resp, dtype=lp.dtype, device=dev).index_add_(
                        0, owner, lp)
                    seq_old = torch.zeros(n_resp, dtype=lp.dtype, device=dev).index_add_(
                        0, owner, old)
                    pg, clip_frac = clipped_policy_loss(seq_lp, seq_old, ro.advantages[resp],
                                                        config.clip_range)
                    loss = pg
                    add("clip_frac", float(clip_frac), n_resp)
                add("policy_loss", float(pg.detach()), len(part))
                accelerator.backward(loss)
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return {name: (v[0], v[1]) for name, v in sums.items()}

    bar = tqdm(total=total_steps, initial=step, desc=f"rl {config.algo}", unit="step",
               disable=not (config.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    prompts_done = responses_done = 0.0
    loop_seconds = 0.0
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        ro = rollout(step)
        t_rollout = time.perf_counter() - t0
        advantages(ro)
        stats = update(ro, step)
        seconds = time.perf_counter() - t0
        assert ro.seq_kl is not None
        n_resp = len(ro.scores)
        lengths = np.array([len(r) for _, rs in ro.rows for r in rs])
        local: dict[str, tuple[float, float]] = {
            "reward_mean": (float(ro.scores.sum()), n_resp),
            "reward_sq": (float((ro.scores ** 2).sum()), n_resp),
            "kl": (float(ro.seq_kl.sum()), n_resp),
            "entropy": (float(ro.entropy.sum()), float(len(ro.entropy))),
            "response_len": (float(lengths.sum()), n_resp),
            "stop_eos": (float(sum(s == "eos" for s in ro.stops)), n_resp),
            "prompts": (float(len(ro.rows)), 1.0),
            **stats}
        names = sorted(local)
        flat = reduce_sums([v for name in names for v in local[name]], accelerator) \
            if world > 1 else [v for name in names for v in local[name]]
        summed = {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(names)}
        record: dict[str, Any] = {"step": step + 1}
        record.update({name: round(s_ / c, 6) for name, (s_, c) in summed.items()
                       if c and name not in ("reward_sq", "prompts")})
        var = summed["reward_sq"][0] / summed["reward_sq"][1] - record["reward_mean"] ** 2
        record["reward_std"] = round(math.sqrt(max(var, 0.0)), 6)
        record["kl_coef"] = round(kl_ctl.coef, 8)
        kl_ctl.update(summed["kl"][0] / summed["kl"][1], int(summed["kl"][1]))
        batch_prompts = summed["prompts"][0]
        record["prompts_per_s"] = round(batch_prompts / seconds, 4)
        record["rollouts_per_s"] = round(batch_prompts * k / seconds, 4)
        record["rollout_seconds"] = round(t_rollout, 4)
        record["lr"] = scheduler.get_last_lr()[0]
        prompts_done += batch_prompts
        responses_done += batch_prompts * k
        loop_seconds += seconds
        step += 1
        history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.3f}",
                        refresh=False)
        if out is not None and config.save_every and step % config.save_every == 0 \
                and step < total_steps:
            write_checkpoint(accelerator, model, out / "checkpoints", step,
                             {"kl_coef": kl_ctl.coef}, save, config.keep_checkpoints)
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model) if out is not None else None
    if out is not None and accelerator.is_main_process:
        save(out / "model", weights)
    steps = [r for r in history if "reward_mean" in r]
    window = final_window(history, "reward_mean")
    metrics: dict[str, Any] = {
        "algo": config.algo, "steps": step, "prompts": n_prompts,
        "samples_per_prompt": k, "first_reward": steps[0]["reward_mean"] if steps else None,
        "final_reward": float(np.mean([r["reward_mean"] for r in window])) if window else None,
        "final_kl": float(np.mean([r["kl"] for r in window])) if window else None,
        "final_window": len(window),
        "prompts_per_s": prompts_done / loop_seconds if loop_seconds else None,
        "rollouts_per_s": responses_done / loop_seconds if loop_seconds else None,
        "shared_prompt": packed, "shared_prompt_off": problem,
        "context_cut_prompts": context_cut, "processes": world,
        "seconds": time.perf_counter() - t_start, "main_process": accelerator.is_main_process}
    finish(out, metrics)
    module_out = accelerator.unwrap_model(model)
    module_out.eval()
    policy.net = module_out.net
    return RunResult(metrics, history, policy)
