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
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hhrlhf.errors import HHRLHFError
from hhrlhf.rl.algorithms import PPO, RLOO, Algorithm, Minibatch, Targets
from hhrlhf.rl.prompts import PROMPT_KINDS
from hhrlhf.rl.rollout import (
    Rollout,
    owners,
    read_without_grad,
    response_dialogue,  # noqa: F401  # re-exported: benchmarks score samples with it
    score_samples,
    token_outputs,
)
from hhrlhf.runs import CommonConfig, RunResult, final_window, inner_state

ALGOS = ("rloo", "ppo")


@dataclass
class RLConfig(CommonConfig):
    policy: str = ""  # the initial policy (a causal LM folder), e.g. an SFT run's model/
    chat_format: str = "auto"  # auto | hh | template: how dialogues become the policy's text
    pm: str = ""  # the preference model folder (hhrlhf pm train, lexical, dpo)
    data: list[str] = field(default_factory=list)  # prompt sources; [] = the default of `prompts`
    prompts: str = "records"  # "records": dialogues up to the final Assistant turn; "redteam"
    max_prompts: int = 0  # 0 = all distinct prompts
    algo: str = "rloo"  # rloo or ppo
    batch_size: int = 16  # prompts per step
    samples_per_prompt: int = 4  # k
    max_new_tokens: int = 64  # tokens per sampled response
    max_length: int = 512  # prompt (end kept) + response
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus mass of the rollouts (1 = off)
    top_k: int = 0  # top-k of the rollouts (0 = off)
    kl_coef: float = 0.05  # the KL penalty's coefficient (beta) in the reward
    kl_target: float = 0.0  # > 0: adaptive coefficient towards this KL per response (nats)
    kl_horizon: int = 10000  # adaptive KL: responses over which the coefficient moves
    update_epochs: int = 0  # passes over each rollout batch; 0 = 1 for rloo, 4 for ppo
    minibatches: int = 0  # optimizer steps per pass; 0 = 1 for rloo, 2 for ppo
    clip_range: float = 0.2  # PPO/RLOO ratio clipping epsilon
    whiten_advantages: bool = True  # advantages scaled to mean 0, std 1 over the batch
    # ppo only
    gamma: float = 1.0
    lam: float = 0.95  # PPO: GAE lambda
    vf_coef: float = 0.1  # PPO: weight of the value loss
    vf_clip: float = 0.2  # PPO: value clipping range
    whiten_rewards: bool = True  # PPO: PM scores whitened over the batch
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
            raise HHRLHFError(f"config samples_per_prompt={self.samples_per_prompt} (--n): "
                              + ("RLOO needs at least 2 (the leave-one-out baseline)"
                                 if self.algo == "rloo" else "must be at least 1"))
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


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def check_device(key: str, value: str) -> None:
    """Raise one line unless ``value`` ("" = the default) names a device torch has here."""
    if not value:
        return
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise HHRLHFError(f"config {key}={value!r}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise HHRLHFError(f"config {key}={value!r}: there is no CUDA GPU here; use cpu or "
                              "leave it unset (the policy's device)")
        if dev.index is not None and dev.index >= count:
            raise HHRLHFError(f"config {key}={value!r}: there {'is' if count == 1 else 'are'} "
                              f"{count} CUDA GPU{'' if count == 1 else 's'} here "
                              f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise HHRLHFError(f"config {key}={value!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise HHRLHFError(f"config {key}={value!r}: not a device (cpu, cuda, cuda:N)")


def algorithm_of(config: RLConfig) -> Algorithm:
    """The configured algorithm, as its small object."""
    if config.algo == "ppo":
        return PPO(config.clip_range, config.whiten_advantages, config.whiten_rewards,
                   config.gamma, config.lam, config.vf_coef, config.vf_clip)
    return RLOO(config.clip_range, config.whiten_advantages)


def train_rl(config: RLConfig, *, pm: Any = None, prompts: list[Any] | None = None,
             resume: bool = False) -> RunResult:
    """RL from ``config.policy`` against ``pm`` (or the PM folder ``config.pm``) on
    ``prompts`` (or those of ``config.data``). One step reads top to bottom at the end: a
    rollout, the algorithm's targets, ``update_epochs`` x ``minibatches`` optimizer steps, the
    step's metrics, a checkpoint."""
    from tqdm import tqdm

    import hhrlhf.pm
    from hhrlhf.packing import collate_full, collate_shared, packing_problem
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.sample import Sampler
    from hhrlhf.rl.advantages import AdaptiveKL
    from hhrlhf.rl.prompts import default_sources, load_prompts
    from hhrlhf.runs import (
        MetricsLog,
        StepGuard,
        StopRequests,
        disk_errors,
        finish,
        make_optimizer,
        prepare_run_folder,
        reduce_stats,
        release_on_error,
        restore_checkpoint,
        start_run,
        write_checkpoint,
    )

    t_start = time.perf_counter()
    config, accelerator = start_run(config)
    for key in ("ref_device", "pm_device"):  # now, not as a traceback after loading the models
        check_device(key, getattr(config, key))
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
    prompt_ids, context_cut = PolicyEncoder(policy.tokenizer, config.max_length).encode_prompts(
        prompts, config.max_length - config.max_new_tokens)
    problem = packing_problem(policy.config, config.max_length)
    collate = collate_shared if problem is None else collate_full
    algo = algorithm_of(config)
    k = config.samples_per_prompt

    # ---- schedule: each step's prompts and seeds are functions of (seed, step) ----
    world, rank = accelerator.num_processes, accelerator.process_index
    n_prompts = len(prompt_ids)
    per_step = min(config.batch_size, n_prompts)
    steps_per_epoch = max(1, n_prompts // per_step)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    epochs_per_batch, n_mini = config.epochs_per_batch, config.minibatches_per_epoch

    def prompts_of(s: int) -> list[int]:
        """Step ``s``'s prompts: a slice of its epoch's permutation; this process's share."""
        epoch, at = divmod(s, steps_per_epoch)
        order = np.random.default_rng(_seed(config.seed, epoch)).permutation(n_prompts)
        chosen = order[at * per_step: (at + 1) * per_step]
        return [int(i) for i in chosen[rank::world]]

    # ---- optimisation and the run folder: the shared skeleton ----
    module = ActorCritic(policy.net, value_head=algo.value_head)
    optimizer, scheduler = make_optimizer(
        [p for p in module.parameters() if p.requires_grad], config,
        total_steps * epochs_per_batch * n_mini)
    model, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    out = prepare_run_folder(config, resume, accelerator.is_main_process)
    kl_ctl = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
    step = 0
    history: list[dict[str, Any]] = []
    guard = StepGuard(accelerator, config.nonfinite, out / "checkpoints" if out else None)
    if resume and out is not None:
        state, history = restore_checkpoint(accelerator, out)
        if state is not None:
            step, kl_ctl.coef = state["step"], state["kl_coef"]
            guard.skipped = state.get("skipped_steps", 0)
    metrics = MetricsLog(out, accelerator.is_main_process, history, append=step > 0)

    def save(path: Path, state: dict[str, Any] | None) -> None:
        policy.save(path, inner_state(state) if state is not None else None)

    unwrapped = accelerator.unwrap_model(model)
    sampler = Sampler(unwrapped.net, policy.tokenizer)

    def collect(s: int) -> Rollout:
        """Step ``s``'s rollout: sample, score, read with the policy and the reference."""
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
        read = functools.partial(read_without_grad, rows=rows, collate=collate,
                                 pad_id=policy.pad_id, batch_size=config.forward_batch_size,
                                 device=dev, autocast=accelerator.autocast)
        old_lp, entropy, old_v = read(unwrapped.net, value_head=unwrapped.value_head)
        ref_lp, _, _ = read(ref_net)
        return Rollout(rows, k, scores, np.concatenate([[0], np.cumsum(lens)]),
                       owners(rows, dev), old_lp, ref_lp, entropy, old_v,
                       [smp.stop for smp in samples])

    def optimise(ro: Rollout, targets: Targets, s: int) -> dict[str, tuple[float, float]]:
        """``update_epochs`` passes of ``minibatches`` optimizer steps over the rollout."""
        sums: dict[str, tuple[float, float]] = {}
        n_rows = len(ro.rows)
        for epoch in range(epochs_per_batch):
            order = np.random.default_rng(_seed(config.seed, s, rank, epoch)).permutation(n_rows)
            for part in np.array_split(order, min(n_mini, n_rows)):
                part = np.sort(part)  # rows in rollout order: their tokens then stay in order
                batch = {key: v.to(dev) for key, v in
                         collate([ro.rows[i] for i in part], policy.pad_id).items()}
                mb = Minibatch(len(part), torch.from_numpy(ro.tokens_of(part)).to(dev),
                               torch.from_numpy(ro.responses_of(part)).to(dev),
                               batch["tok_owner"])
                with accelerator.autocast():
                    lp, _, values = model(batch)
                loss, stats = algo.loss(ro, targets, mb, lp, values)
                for name, (v, c) in stats.items():
                    acc = sums.get(name, (0.0, 0.0))
                    sums[name] = (acc[0] + v, acc[1] + c)
                guard.add_loss(loss)
                accelerator.backward(loss)
                if guard.step_ok(model, config.max_grad_norm, s + 1):  # clips; nan, inf
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return sums

    def step_record(ro: Rollout, targets: Targets, stats: dict[str, tuple[float, float]],
                    s: int) -> dict[str, Any]:
        """Step ``s``'s metrics, summed over processes. ``kl``: the mean of the responses'
        summed per-token ``log pi_old - log ref``, a sample estimate (it can be negative)."""
        n = ro.responses
        lengths = ro.response_lengths()
        summed = reduce_stats({
            "reward_mean": (float(ro.scores.sum()), n),
            "reward_sq": (float((ro.scores ** 2).sum()), n),
            "kl": (float(targets.seq_kl.sum()), n),
            "entropy": (float(ro.entropy.sum()), float(len(ro.entropy))),
            "response_len": (float(lengths.sum()), n),
            "stop_eos": (float(sum(x == "eos" for x in ro.stops)), n),
            "prompts": (float(len(ro.rows)), 1.0),
            **stats}, accelerator)
        record: dict[str, Any] = {"step": s + 1}
        record.update({name: round(v / c, 6) for name, (v, c) in summed.items()
                       if c and name not in ("reward_sq", "prompts")})
        var = summed["reward_sq"][0] / summed["reward_sq"][1] - record["reward_mean"] ** 2
        record["reward_std"] = round(math.sqrt(max(var, 0.0)), 6)
        record["kl_coef"] = round(kl_ctl.coef, 8)
        kl_ctl.update(summed["kl"][0] / summed["kl"][1], int(summed["kl"][1]))
        record["prompts"] = summed["prompts"][0]
        return record

    # ---- the loop ----
    bar = tqdm(total=total_steps, initial=step, desc=f"rl {config.algo}", unit="step",
               disable=not (config.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    prompts_done = responses_done = 0.0
    loop_seconds = 0.0
    model.train()
    # SIGTERM: the step ends and is checkpointed first; an error releases the run folder
    with StopRequests() as stop, release_on_error(out):
        while step < total_steps:
            t0 = time.perf_counter()
            ro = collect(step)
            t_rollout = time.perf_counter() - t0
            targets = algo.targets(ro, kl_ctl.coef)
            stats = optimise(ro, targets, step)
            seconds = time.perf_counter() - t0
            record = step_record(ro, targets, stats, step)
            batch_prompts = record.pop("prompts")
            record["prompts_per_s"] = round(batch_prompts / seconds, 4)
            record["rollouts_per_s"] = round(batch_prompts * k / seconds, 4)
            record["rollout_seconds"] = round(t_rollout, 4)
            record["lr"] = scheduler.get_last_lr()[0]
            prompts_done += batch_prompts
            responses_done += batch_prompts * k
            loop_seconds += seconds
            step += 1
            metrics.log(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.3f}",
                            refresh=False)

            def checkpoint(step: int = step) -> None:
                assert out is not None
                write_checkpoint(accelerator, model, out / "checkpoints", step,
                                 {"kl_coef": kl_ctl.coef, "logged": len(history),
                                  "skipped_steps": guard.skipped}, save, config.keep_checkpoints)

            saved = out is not None and config.save_every and step % config.save_every == 0 \
                and step < total_steps
            if saved:
                checkpoint()
            stop.at_step_end(accelerator, None if saved or out is None else checkpoint)
    bar.close()
    metrics.close()
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model) if out is not None else None
    if out is not None and accelerator.is_main_process:
        with disk_errors("the final model", out):
            save(out / "model", weights)
    steps = [r for r in history if "reward_mean" in r]
    window = final_window(history, "reward_mean")
    result: dict[str, Any] = {
        "algo": config.algo, "steps": step, "prompts": n_prompts,
        "samples_per_prompt": k, "skipped_steps": guard.skipped, "first_reward": steps[0]["reward_mean"] if steps else None,
        "final_reward": float(np.mean([r["reward_mean"] for r in window])) if window else None,
        "final_kl": float(np.mean([r["kl"] for r in window])) if window else None,
        "final_window": len(window),
        "prompts_per_s": prompts_done / loop_seconds if loop_seconds else None,
        "rollouts_per_s": responses_done / loop_seconds if loop_seconds else None,
        "shared_prompt": problem is None, "shared_prompt_off": problem,
        "context_cut_prompts": context_cut, "processes": world,
        "seconds": time.perf_counter() - t_start, "main_process": accelerator.is_main_process}
    finish(out, result)
    module_out = accelerator.unwrap_model(model)
    module_out.eval()
    policy.net = module_out.net
    return RunResult(result, history, policy)
