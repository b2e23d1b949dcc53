"""hhrlhf rl: PPO and RLOO raise a learnable reward; packed KL equals the unpacked one;
red-team prompts; one-line errors; kill -9 resume with identical results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import ENV, TINY, build_tiny, first_rows, one_thread  # noqa: F401

from hhrlhf.pm.base import PreferenceModel
from hhrlhf.records import Dialogue

HHRLHF = str(Path(".venv/bin/hhrlhf").resolve())


class VowelShare(PreferenceModel):
    """A real (tiny) preference model: the share of vowels in the final response. A tiny
    random policy can learn to raise it within a few dozen steps."""

    kind = "test-vowels"

    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        out = []
        for d in dialogues:
            text = d.turns[-1].text if d.turns else ""
            out.append(sum(c in "aeiou" for c in text) / max(1, len(text)))
        return np.asarray(out, dtype=np.float32)

    def save(self, path: str | Path) -> None:
        raise NotImplementedError("lives in the test only")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, real_file: Path) -> tuple[Path, list]:
    rows = first_rows(real_file, 60)
    folder = tmp_path_factory.mktemp("rl") / "policy"
    build_tiny(rows, folder)
    return folder, [Dialogue(c.prompt, c.chosen_dialogue.preamble) for c in rows]


# the per-step statistics are read from detached tensors (no torch UserWarning)
@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad=True")
@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_rl_raises_a_learnable_reward(tiny: tuple[Path, list], algo: str) -> None:
    from hhrlhf.rl.train import RLConfig, train_rl

    policy, prompts = tiny
    config = RLConfig(policy=str(policy), pm="(in memory)", algo=algo, batch_size=8,
                      samples_per_prompt=4, max_new_tokens=8, max_length=128, lr=3e-2,
                      kl_coef=0.01, max_steps=20, out_dir="", progress=False)
    result = train_rl(config, pm=VowelShare(), prompts=prompts)
    rewards = [r["reward_mean"] for r in result.history]
    assert len(rewards) == 20
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    kls = [r["kl"] for r in result.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the initial policy's
    assert kls[-1] > 0.5  # it moved away from the initial policy, and the KL shows it
    last = result.history[-1]
    for key in ("entropy", "response_len", "clip_frac", "kl_coef", "prompts_per_s"):
        assert key in last
    assert ("value_loss" in last) == (algo == "ppo")


def test_packed_kl_equals_unpacked(tiny: tuple[Path, list]) -> None:
    """The trainer's readings of a rollout (per-token log-probs and entropy, the sequence KL)
    from one packed row [prompt, r1..r4] per prompt equal those from four full rows
    prompt + r_i."""
    from contextlib import nullcontext

    from hhrlhf.packing import collate_full, collate_shared
    from hhrlhf.policy import Policy
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.sample import Sampler
    from hhrlhf.rl.algorithms import sequence_kl
    from hhrlhf.rl.rollout import Rollout, owners, read_without_grad

    folder, prompts = tiny
    policy = Policy.load(folder)
    ref = Policy.load(folder).net
    torch.manual_seed(1)
    with torch.no_grad():  # a reference the policy has moved away from
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, _ = PolicyEncoder(policy.tokenizer, 128).encode_prompts(prompts[:6], 100)
    samples = Sampler(policy.net, policy.tokenizer).sample(ids, n=4, max_new_tokens=12, seed=3)
    rows = [(p, [np.asarray(samples[j * 4 + m].tokens) for m in range(4)])
            for j, p in enumerate(ids)]
    cpu = torch.device("cpu")
    results = []
    for collate in (collate_shared, collate_full):
        def read(net: object, collate: object = collate) -> tuple:
            return read_without_grad(net, rows, collate, policy.pad_id, 4, cpu, nullcontext)
        lp, ent, _ = read(policy.net)
        ref_lp, _, _ = read(ref)
        lens = [sum(len(r) for r in rs) for _, rs in rows]
        ro = Rollout(rows, 4, np.zeros(24), np.concatenate([[0], np.cumsum(lens)]),
                     owners(rows, cpu), lp, ref_lp, ent, None, [])
        results.append((lp - ref_lp, ent, sequence_kl(ro)))
    (kl_p, ent_p, seq_p), (kl_f, ent_f, seq_f) = results
    assert seq_p.abs().max() > 0.01  # not trivially zero
    torch.testing.assert_close(kl_p, kl_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seq_p, seq_f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent_p, ent_f, atol=1e-5, rtol=1e-4)


def test_redteam_prompts_are_opening_human_turns(tmp_path: Path, real_file: Path) -> None:
    from redteam_gen import write_redteam_file

    from hhrlhf.errors import HHRLHFError
    from hhrlhf.rl.prompts import load_prompts

    path = tmp_path / "red_team_attempts.jsonl.gz"
    write_redteam_file(path, n=200)
    got = load_prompts([str(path)], "redteam")
    assert got and all(len(d.turns) == 1 and d.turns[0].role == "human" for d in got)
    assert len({d.render() for d in got}) == len(got)
    records = load_prompts([str(real_file)], "records", limit=50)
    assert len(records) == 50 and all(d.turns[-1].role == "human" for d in records)
    with pytest.raises(HHRLHFError, match="red-team transcripts"):
        load_prompts([str(path)], "records")
    with pytest.raises(HHRLHFError, match="preference rows"):
        load_prompts([str(real_file)], "redteam")


def test_rl_and_rl_eval_read_the_same_redteam_openings(tmp_path: Path) -> None:
    """`hhrlhf rl --prompts redteam` and `hhrlhf rl eval --redteam` take the same prompts: each
    transcript's opening Human turn, an empty one left out, each distinct text once."""
    import gzip

    from redteam_gen import make_rows

    from hhrlhf.rl.prompts import load_prompts, redteam_openings

    rows, _ = make_rows(100, seed=5)
    rows[0]["transcript"] = "\n\nHuman: \n\nAssistant: What do you mean?"
    rows[1]["transcript"] = "\n\nHuman: same start\n\nAssistant: one"
    rows[2]["transcript"] = "\n\nHuman:same start\n\nAssistant: two"
    path = tmp_path / "red_team_attempts.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(rows).encode()))
    got = load_prompts([str(path)], "redteam")
    assert got == redteam_openings([str(path)])
    texts = [d.turns[0].text for d in got]
    assert texts[0] == "same start" and "" not in texts and len(set(texts)) == len(texts)
    assert load_prompts([str(path)], "redteam", limit=3) == got[:3]


@pytest.fixture(scope="module")
def lexical_pm(tmp_path_factory: pytest.TempPathFactory, real_file: Path) -> Path:
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    folder = tmp_path_factory.mktemp("pm") / "lexical"
    LexicalPreferenceModel.fit(first_rows(real_file, 300)).save(folder)
    return folder


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([HHRLHF, *args], check=False, capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_one_line_errors(tmp_path: Path, tiny: tuple[Path, list], lexical_pm: Path,
                         real_file: Path) -> None:
    from transformers import BertConfig

    policy, _ = tiny
    out = tmp_path / "run"
    # a folder that is not a PM (a policy folder)
    proc = run_cli("rl", "--policy", str(policy), "--pm", str(policy), str(real_file), "--out",
                   str(out), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("hhrlhf: error: ") and "not an hhrlhf preference model" \
        in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # a folder that is not a causal LM (an encoder)
    bert = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(bert)
    proc = run_cli("rl", "--policy", str(bert), "--pm", str(lexical_pm), str(real_file),
                   "--out", str(out), "--set", "max_prompts=4", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "not a causal language model (bert)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # no half-made run folder


def test_resume_takes_the_saved_configuration(tmp_path: Path, tiny: tuple[Path, list]
                                              ) -> None:
    """`hhrlhf rl --out RUN --resume` continues RUN with the policy and PM it saved."""
    from hhrlhf.rl.train import RLConfig
    from hhrlhf.runs import resolve_config, write_json

    policy, _ = tiny
    run, gone = tmp_path / "run", tmp_path / "gone-pm"
    write_json(run / "config.json", RLConfig(policy=str(policy), pm=str(gone), algo="ppo",
                                             out_dir=str(run)).to_dict())
    cfg = resolve_config(RLConfig, None, {"out_dir": str(run)}, resume=True)
    assert (cfg.policy, cfg.pm, cfg.algo) == (str(policy), str(gone), "ppo")
    proc = run_cli("rl", "--out", str(run), "--resume", "-q", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"hhrlhf: error: {gone}: no such model folder"


def test_kill9_resume_gives_identical_results(tmp_path: Path, tiny: tuple[Path, list],
                                              lexical_pm: Path, real_file: Path) -> None:
    """A run killed (SIGKILL) after a checkpoint and resumed ends with the same metrics and
    weights as an uninterrupted run; the run folder follows the RL contract."""
    from safetensors.torch import load_file

    from hhrlhf.policy import Policy

    policy, _ = tiny
    common = ["--policy", str(policy), "--pm", str(lexical_pm), str(real_file), "--algo", "ppo",
              "--k", "2",
              "--batch-size", "4", "--max-new-tokens", "24", "--max-steps", "6", "--lr",
              "1e-3", "-q", "--set", "save_every=2", "--set", "max_prompts=40",
              "--set", "max_length=256", "--set", "threads=1"]
    whole = tmp_path / "whole"
    run_cli("rl", *common, "--out", str(whole))

    cut = tmp_path / "cut"
    proc = subprocess.Popen([HHRLHF, "rl", *common, "--out", str(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step-00000002").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "result.json").exists(), "the run ended before it could be killed"
    run_cli("rl", "--out", str(cut), "--resume", "-q")

    def metrics(folder: Path) -> list[dict]:
        drop = ("prompts_per_s", "rollouts_per_s", "rollout_seconds")
        return [{k: v for k, v in json.loads(line).items() if k not in drop}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert metrics(cut) == metrics(whole)
    assert len(metrics(whole)) == 6
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(cut / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    config = json.loads((whole / "config.json").read_text())
    assert config["algo"] == "ppo" and config["policy"] == str(policy)
    assert config["pm"] == str(lexical_pm) and config["data"] == [str(real_file)]
    row = metrics(whole)[-1]
    for key in ("step", "reward_mean", "kl", "entropy", "response_len", "clip_frac",
                "value_loss", "kl_coef"):
        assert key in row
    assert json.loads((whole / "result.json").read_text())["steps"] == 6
    Policy.load(whole / "model")


def test_rl_is_a_group_with_a_default_train_and_a_lazy_eval(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """`hhrlhf rl --policy P --pm PM` is `hhrlhf rl train --policy P --pm PM`; `rl eval` runs
    the command of hhrlhf.commands.rl_eval once that module exists, and is absent before; the
    group's help shows how to train and evaluate."""
    import sys
    import types

    import click
    from click.testing import CliRunner

    from hhrlhf.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["rl", "--help"])
    assert listed.exit_code == 0 and "train" in listed.output
    assert "hhrlhf rl train --policy" in listed.output and "hhrlhf rl eval runs/" in listed.output
    missing = runner.invoke(cli, ["rl", "train", "--policy", "a-policy"])
    assert missing.exit_code == 2 and "missing option '--pm'" in missing.output
    default = runner.invoke(cli, ["rl", "--policy", "a-policy"])  # no subcommand: train
    assert default.exit_code == 2 and "missing option '--pm'" in default.output

    @click.command("eval")
    @click.argument("run")
    def rl_eval(run: str) -> None:
        click.echo(f"evaluated {run}")

    module = types.ModuleType("hhrlhf.commands.rl_eval")
    module.rl_eval = rl_eval  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hhrlhf.commands.rl_eval", module)
    got = runner.invoke(cli, ["rl", "eval", "runs/rl"])
    assert got.exit_code == 0 and got.output == "evaluated runs/rl\n"
    assert "eval" in runner.invoke(cli, ["rl", "--help"]).output
