"""The shared training skeleton (hhrlhf.runs) as SFT meets it: what it took over from the PM
trainer (the finished-run resume, whole-run throughput, amounts over accumulated batches)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from policy_support import (
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
)

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison
from hhrlhf.runs import LoopConfig, apply_overrides


@pytest.fixture(scope="module")
def rows(real_file: Path) -> list[Comparison]:
    return first_rows(real_file, 120)


@pytest.fixture(scope="module")
def start(rows: list[Comparison], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("p") / "tiny"
    build_tiny(rows, folder)  # saved there
    return folder


def test_resuming_a_finished_sft_run_logs_its_final_evaluation_once(
        start: Path, rows: list[Comparison], tmp_path: Path) -> None:
    """The last checkpoint is at the final step: resuming the finished run, or one killed
    after its final evaluation, evaluates once more in place of the logged evaluation and
    reports the whole run's throughput (not the zero steps of the resumed session)."""
    from hhrlhf.policy.sft import SFTConfig, train_sft

    run = tmp_path / "run"
    cfg = SFTConfig(policy=str(start), out_dir=str(run), max_steps=4, batch_size=4,
                    max_length=64, save_every=2, eval_every=2, holdout_folds=4,
                    progress=False, threads=1)

    def evaluations() -> list[int]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in lines if "eval_loss" in r]

    first = train_sft(cfg, rows).metrics
    assert evaluations() == [2, 4]
    for kill_after_final_eval in (False, True):
        if kill_after_final_eval:
            shutil.rmtree(run / "model")
            (run / "result.json").unlink()
        again = train_sft(cfg, rows, resume=True).metrics
        assert evaluations() == [2, 4]
        assert again["tokens_per_s"] > 0 and again["train_seconds"] > 0
        assert again["eval_loss"] == first["eval_loss"] and again["steps"] == 4
        assert json.loads((run / "result.json").read_text())["tokens_per_s"] > 0


def test_a_step_logs_the_tokens_of_all_its_micro_batches(start: Path,
                                                        rows: list[Comparison]) -> None:
    """Gradient accumulation (accelerate's): 2 micro-batches of 4 rows make a step of the
    8 rows one batch of 8 makes, and the step's record counts all their tokens."""
    from hhrlhf.policy.sft import SFTConfig, train_sft

    cfg = SFTConfig(policy=str(start), out_dir="", max_steps=3, max_length=64,
                    group_by_length=False, progress=False, threads=1)
    accumulated = train_sft(replace(cfg, batch_size=4, grad_accum=2), rows).history
    whole = train_sft(replace(cfg, batch_size=8), rows).history
    assert [r["tokens"] for r in accumulated] == [r["tokens"] for r in whole]
    assert len(accumulated) == 3


@pytest.mark.parametrize(("key", "hint"), [
    ("learning_rate", "did you mean 'lr'?"),
    ("kl_coeff", "did you mean 'kl_coef'?"),
    ("num_generations", "did you mean 'samples_per_prompt'?"),
    ("gradient_accumulation_steps", "did you mean 'grad_accum'?"),
    ("bach_size", "did you mean 'batch_size'"),
])
def test_an_unknown_key_gets_the_key_meant(key: str, hint: str) -> None:
    from hhrlhf.policy.sft import SFTConfig
    from hhrlhf.rl.train import RLConfig

    config = SFTConfig() if key == "gradient_accumulation_steps" else RLConfig()
    with pytest.raises(HHRLHFError) as e:
        apply_overrides(config, {key: "1"})
    message = str(e.value)
    assert message == f"unknown config key {key!r}; {hint}" or (
        message.startswith(f"unknown config key {key!r}; {hint}"))
    assert "known:" not in message  # not a list of fifty keys


def test_an_unknown_key_with_no_near_name_lists_the_known_ones() -> None:
    with pytest.raises(HHRLHFError, match="known: max_length, attn_implementation"):
        apply_overrides(LoopConfig(), {"zzz": "1"})


def test_one_final_window_for_every_trainer() -> None:
    """The final train figures of every trainer (sft, dpo, pm train, rl) are means over the
    same last FINAL_WINDOW logged steps; eval records in between are not steps."""
    from hhrlhf.runs import FINAL_WINDOW, final_window, inner_state

    history = [{"step": i, "loss": float(i)} if i % 7 else {"step": i, "eval_loss": 0.0}
               for i in range(1, 200)]
    window = final_window(history, "loss")
    assert len(window) == FINAL_WINDOW and window[-1]["step"] == 199
    assert all("loss" in r for r in window)
    assert len(final_window(history[:8], "loss")) == 7
    assert inner_state({"net.a.weight": 1, "value_head.b": 2}) == {"a.weight": 1}


def test_checkpoints_print_no_tied_weights_warning(caplog: pytest.LogCaptureFixture) -> None:
    """accelerate warns "Removed shared tensor" at every save of a model with tied embeddings
    (every tiny policy); inside a checkpoint write it is dropped, elsewhere it is left alone."""
    import logging

    import torch
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    from hhrlhf.runs import quiet_tied_weights

    PartialState(cpu=True)  # accelerate's logger needs its state

    shared = torch.zeros(3)

    def save() -> None:
        clean_state_dict_for_safetensors({"embed.weight": shared, "lm_head.weight": shared})

    with caplog.at_level(logging.WARNING):
        with quiet_tied_weights():
            save()
        assert "Removed shared tensor" not in caplog.text
        save()
    assert "Removed shared tensor" in caplog.text  # the filter is gone again
