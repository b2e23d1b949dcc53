"""Reward models hhrlhf did not train: a transformers ``AutoModelForSequenceClassification``
folder with one output, as TRL's RewardTrainer saves one (and as reward models are published).

Such a folder has no ``hhrlhf_pm.json``; :func:`hhrlhf.pm.base.model_kind` calls it the kind
``reward_model`` when its config names a sequence classifier with ``num_labels == 1``, and
refuses judges (more outputs, causal or sequence-to-sequence language models) in one line.

It is scored as the model expects its input, not as hhrlhf encodes its own models: the
dialogue through the tokenizer's chat template where it has one, else the HH text; tokenized
whole, cut by the tokenizer (its ``truncation_side``, to its ``model_max_length``, at most the
model's positions); see :class:`hhrlhf.pm.encode.TextEncoder`. The reward is the model's own
``logits[:, 0]``: for an encoder its forward; for a decoder the head at the final token that is
not the pad token, which hhrlhf reads itself so that pairs and groups can share their context
in packed rows where the family packs exactly (:mod:`hhrlhf.packing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hhrlhf.atomic import move_into_place, temp_beside
from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.encode import TextEncoder
from hhrlhf.pm.model import (
    NeuralPreferenceModel,
    RewardNet,
    head_name,
    is_decoder_config,
    quiet_transformers,
)

# tokenizer.model_max_length when the tokenizer names no limit (transformers' VERY_LARGE_INTEGER)
_NO_LIMIT = 1 << 40


def max_length_of(tok: Any, config: Any) -> int:
    """Tokens the model takes: its tokenizer's ``model_max_length``, at most its positions."""
    limits = [int(tok.model_max_length)] if tok.model_max_length < _NO_LIMIT else []
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    if positions:
        limits.append(int(positions))
    return min(limits) if limits else _NO_LIMIT


class TransformersRewardModel(NeuralPreferenceModel):
    """A transformers reward model loaded from its folder (:func:`hhrlhf.pm.load`)."""

    kind = "reward_model"

    @classmethod
    def _load(cls, folder: Path) -> TransformersRewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(folder)
                net = AutoModelForSequenceClassification.from_pretrained(
                    folder, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            msg = " ".join(str(e).split())[:300]
            raise HHRLHFError(f"cannot load reward model: {msg}", folder) from None
        net.eval()
        config = net.config.get_text_config() if hasattr(net.config, "get_text_config") \
            else net.config
        decoder = is_decoder_config(net.config)
        # A decoder's reward: transformers reads the head at the rightmost token that is not
        # config.pad_token_id. hhrlhf reads it itself (pooling "last": packed rows) where the
        # head is linear, the row stripped of trailing pad ids (TextEncoder) to read there.
        last = decoder and isinstance(getattr(net, head_name(net)), nn.Linear)
        pad_config = config.pad_token_id
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id, pad_config)
                    if t is not None), 0)
        if decoder and not last and pad_config is None:
            # transformers' own forward pads a batch only with a pad token (TRL sets EOS)
            config.pad_token_id = pad
            pad_config = pad
        tok.padding_side = "right"  # our batches: right-padded, as collate_sequences makes them
        max_length = max_length_of(tok, config)
        encoder = TextEncoder(tok, max_length, strip_id=pad_config if decoder else None)
        pm = cls(RewardNet(net, "last" if last else "cls"), tok, max_length,
                 encoder=encoder)
        pm.pad_id = int(pad)
        if torch.cuda.is_available():  # scoring where it is fastest, as for hhrlhf's own
            pm.to("cuda")
        return pm

    def save(self, path: str | Path, state_dict: dict[str, Any] | None = None) -> None:
        """The model as the transformers folder it came from (config, weights, tokenizer; no
        ``hhrlhf_pm.json``): it loads again as a reward model. Atomic."""
        folder = Path(path)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(folder, folder=True)
        net_state = None
        if state_dict is not None:
            net_state = {k[4:]: v for k, v in state_dict.items() if k.startswith("net.")}
        with quiet_transformers():
            self.reward_net.net.save_pretrained(tmp, state_dict=net_state)
            self.tokenizer.save_pretrained(tmp)
        move_into_place(tmp, folder)
