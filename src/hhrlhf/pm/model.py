"""The neural preference model: a transformers backbone and a linear value head.

The network is a transformers ``AutoModelForSequenceClassification`` with one label; hhrlhf
only chooses where the reward is read (the pooling):

- ``last`` (default for decoders: GPT-2, Llama, Pythia, Qwen shapes): the hidden state of the
  final token of the dialogue goes through the head (``score``). That is what
  ``AutoModelForSequenceClassification`` computes for these models: it reads the rightmost
  token that is not the pad token, so hhrlhf never lets the pad token end a row (see
  :func:`_choose_pad`);
- ``cls`` (default for encoders: BERT shapes): the model's own sequence-classification output
  (BERT's pooler over ``[CLS]``, then ``classifier``), which transformers computes alone;
- ``mean``: the masked mean of the last hidden states through the linear head. Transformers
  has no class that computes it for these backbones.

A saved model loads with ``AutoModelForSequenceClassification`` (as TRL, OpenRLHF and
DeepSpeed-Chat load a reward model) and gives hhrlhf's scores exactly where transformers
computes the pooling (:func:`transformers_computes`). Any other model (``mean``, or ``last`` on
an encoder) is saved as ``backbone/`` (an ``AutoModel`` folder) plus ``value_head.safetensors``,
beside a ``config.json`` whose model type no transformers class takes:
``AutoModelForSequenceClassification`` refuses the folder, with a message that says why,
instead of reading another pooling and giving a silently wrong reward.

Shared-context scoring (decoders): the two sides of a pair share their context, so a pair is one
row ``[context, chosen, rejected]`` with a block-causal mask and position ids that restart the
rejected branch after the context (see :func:`hhrlhf.pm.encode.collate_packed`). The context is
computed once and each response attends to it and to itself only, so the scores equal those of
the two full sequences (held equal in the tests), at fewer tokens.

Read-out-only last layer (decoders): the last layer runs in full only for its keys and values;
the rest of it runs at the read-out positions alone (see :mod:`hhrlhf.pm.readout`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hhrlhf.atomic import atomic_folder
from hhrlhf.errors import HHRLHFError
from hhrlhf.packing import (  # noqa: F401  # PACKABLE: re-exported
    PACKABLE,
    collate_shared,
    packing_problem,
)
from hhrlhf.pm.base import (
    MARKER_FILE,
    PreferenceModel,
    as_turn,
    group_dialogues,
    write_marker,
)
from hhrlhf.pm.config import resolve_backbone
from hhrlhf.pm.encode import (
    DialogueEncoder,
    EncodedPairs,
    collate_packed,
    collate_pairs_full,
    collate_sequences,
    sorted_batches,
)
from hhrlhf.pm.readout import readout, readout_family
from hhrlhf.records import Comparison, Dialogue, Turn


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading bar (a fresh value head is expected)."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def is_decoder_config(config: Any) -> bool:
    """Causal (decoder) models: a causal-LM architecture that is not also a masked-LM one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _zero_dropout(config: Any) -> None:
    # Every float setting named like a dropout (hidden_dropout_prob, attn_pdrop, attention_dropout
    # ...) to 0, before the model is built: covers attention kernels that read the config value.
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)


def transformers_computes(pooling: str, decoder: bool) -> bool:
    """Whether ``AutoModelForSequenceClassification``'s own forward computes this pooling:
    ``cls`` (its output, whatever the backbone), and ``last`` on a decoder (its read-out)."""
    return pooling == "cls" or (pooling == "last" and decoder)


def _choose_pad(tok: Any, net: Any) -> None:
    """Give the tokenizer a pad token that never ends an encoded dialogue.

    A decoder's ``AutoModelForSequenceClassification`` reads the reward at the rightmost token
    that is not ``config.pad_token_id`` (left or right padding alike). Were the pad token also
    the tokenizer's closing token (an EOS appended to every text, with pad = EOS as GPT-style
    set-ups make it), transformers would read one token too early. So the pad token is one the
    encoder never puts last: the tokenizer's own, else EOS, UNK or BOS, else a new one.
    """
    closing = DialogueEncoder(tok, 1 << 20).suffix[-1:].tolist()  # what ends every row
    if tok.pad_token_id is not None and tok.pad_token_id not in closing:
        return
    for candidate in (tok.eos_token, tok.unk_token, tok.bos_token):
        if candidate is not None and tok.convert_tokens_to_ids(candidate) not in closing:
            tok.pad_token = candidate
            return
    tok.add_special_tokens({"pad_token": "<|hhrlhf_pad|>"})
    net.resize_token_embeddings(len(tok))


def head_name(net: Any) -> str:
    """The attribute of a sequence-classification model that holds its value head."""
    for name in ("score", "classifier"):
        if isinstance(getattr(net, name, None), nn.Module):
            return name
    raise HHRLHFError(f"{type(net).__name__} has no value head (score/classifier)")


class RewardNet(nn.Module):
    """The module that training wraps (DDP/FSDP): ``forward(batch)`` -> one reward per row.

    A batch from :func:`collate_sequences` gives one reward per sequence; a packed batch from
    :func:`collate_packed` gives ``cat([chosen rewards, rejected rewards])`` - the same layout
    as :func:`collate_pairs_full`, so the loss code is one line either way.
    """

    def __init__(self, net: Any, pooling: str, last_layer_readout: bool = True):
        # net: an AutoModelForSequenceClassification
        super().__init__()
        self.net = net
        self.pooling = pooling
        # the readout family, or None: the last layer runs in full at every position
        self.readout = readout_family(self.backbone) if (
            last_layer_readout and pooling == "last") else None
        self._no_cache = {"use_cache": False} if is_decoder_config(net.config) else {}
        if pooling in ("mean", "last") and not isinstance(self.head, nn.Linear):
            raise HHRLHFError(f"pooling={pooling} needs a linear value head; this backbone's "
                              f"is {type(self.head).__name__}: use pooling=cls")
        if pooling in ("mean", "last"):
            # Parts of the classification model this pooling does not use (BERT's pooler) get
            # no gradient: freeze them so DDP does not wait for their gradients.
            used = {id(p) for p in self.backbone.parameters()} | {id(p) for p in
                                                                   self.head.parameters()}
            pooler = getattr(self.backbone, "pooler", None)
            if pooler is not None:
                for p in pooler.parameters():
                    p.requires_grad_(False)
            for p in self.net.parameters():
                if id(p) not in used:
                    p.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        base: nn.Module = self.net.base_model
        return base

    @property
    def head(self) -> nn.Module:
        head: nn.Module = getattr(self.net, head_name(self.net))
        return head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "mask" in batch:  # packed pairs: read at the chosen and the rejected final token
            mask = batch["mask"]
            select = torch.stack([batch["idx_chosen"], batch["idx_rejected"]], dim=1)  # (B, 2)
            rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
            h = self._read(select, mask[rows, 0, select][:, None], input_ids=batch["input_ids"],
                           attention_mask=self._backbone_mask(mask),
                           position_ids=batch["position_ids"])
            return self.head(torch.cat([h[:, 0], h[:, 1]])).squeeze(-1).float()
        if self.pooling == "cls":
            return self.net(input_ids=batch["input_ids"],  # type: ignore[no-any-return]
                            attention_mask=batch["attention_mask"]).logits[:, 0].float()
        if self.pooling == "last":  # right-padded rows: the final token sees every real one
            last = batch["last"]
            width = batch["input_ids"].shape[1]
            keys = torch.arange(width, device=last.device)[None, :] <= last[:, None]
            pooled = self._read(last[:, None], keys[:, None, None, :],
                                input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"])[:, 0]
        else:  # mean over the real tokens
            h = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              **self._no_cache).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1).float()

    def _read(self, select: torch.Tensor, keys: torch.Tensor, **inputs: torch.Tensor
              ) -> torch.Tensor:
        """Final hidden states at ``select`` (B, S) -> (B, S, d); ``keys`` (B, 1, S, T) bool:
        what each of those positions attends to. The last layer runs only there when the
        backbone allows it (:mod:`hhrlhf.pm.readout`)."""
        if self.readout is not None:
            return readout(self.backbone, self.readout, select=select, keys=keys, **inputs)
        h = self.backbone(**inputs, **self._no_cache).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        return h[rows, select]  # type: ignore[no-any-return]

    def _backbone_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean 4D mask as the backbone's attention takes it (eager: additive floats)."""
        if getattr(self.net.config, "_attn_implementation", "sdpa") != "eager":
            return mask
        dtype = next(self.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min)


class NeuralPreferenceModel(PreferenceModel):
    """A preference model on a transformers backbone. Build with :meth:`from_backbone`, or
    load a saved one with :func:`hhrlhf.pm.load`."""

    kind = "neural"

    def __init__(self, reward_net: RewardNet, tokenizer: Any, max_length: int,
                 shared_context: bool = True, precision: str = "auto", encoder: Any = None):
        # encoder: how dialogues become token ids (a DialogueEncoder, hhrlhf's own turn-wise
        # encoding, unless given: a TextEncoder for a reward model hhrlhf did not train)
        self.reward_net = reward_net
        # Scoring precision, as TrainConfig.mixed_precision: "no" (fp32), "bf16", "fp16", or
        # "auto" (bf16 on a GPU, fp32 on CPU).
        self.precision = precision
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.encoder = encoder if encoder is not None else DialogueEncoder(tokenizer, max_length)
        self.is_decoder = is_decoder_config(reward_net.net.config)
        # Why a decoder read at the final token cannot pack its pairs exactly (None: it can, or
        # the model is no such decoder).
        self.packing_problem = packing_problem(reward_net.net.config, self.max_length) if (
            self.is_decoder and reward_net.pooling == "last") else None
        self.shared_context = bool(shared_context and self.packs_exactly)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)

    @property
    def pooling(self) -> str:
        return self.reward_net.pooling

    @property
    def packs_exactly(self) -> bool:
        """Whether a packed pair scores as its two full rows. Only a decoder read at the final
        token can pack: an encoder attends both ways, so the two sides share nothing."""
        return self.is_decoder and self.pooling == "last" and self.packing_problem is None

    @property
    def device(self) -> torch.device:
        return next(self.reward_net.parameters()).device

    def to(self, device: str | torch.device) -> NeuralPreferenceModel:
        self.reward_net.to(device)
        return self

    # -- building and loading ----------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str, *, tokenizer: str = "", pooling: str = "auto",
                      max_length: int = 512, attn_implementation: str = "auto",
                      disable_dropout: bool = True, shared_context: bool = True,
                      last_layer_readout: bool = True) -> NeuralPreferenceModel:
        """A fresh value head on a pretrained (or randomly initialised, saved) backbone."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        source = resolve_backbone(backbone)
        tok_source = resolve_backbone(tokenizer) if tokenizer else source
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(source, num_labels=1)
                if getattr(config, "is_encoder_decoder", False):
                    raise HHRLHFError(f"backbone {backbone!r} is an encoder-decoder "
                                      f"({config.model_type}); a preference model needs a "
                                      "decoder or an encoder")
                tok = AutoTokenizer.from_pretrained(tok_source)
                if disable_dropout:
                    _zero_dropout(config)
                # "auto": transformers' choice, sdpa where the model has it, else eager
                net = AutoModelForSequenceClassification.from_pretrained(
                    source, config=config, dtype=torch.float32,
                    attn_implementation=None if attn_implementation == "auto"
                    else attn_implementation)
                _choose_pad(tok, net)
                net.config.pad_token_id = tok.pad_token_id
                # Saved with the tokenizer: a batch padded by it reads as hhrlhf reads it
                # (left padding moves absolute positions: GPT-2's rewards would change).
                tok.padding_side = "right"
                # and one that cuts as hhrlhf cuts: the plain `tok(text, truncation=True)` of a
                # long dialogue keeps its end, max_length tokens, special tokens included (the
                # same ones hhrlhf puts: neither appends an EOS of its own). Equal ids whenever
                # the final turn fits; hhrlhf keeps the start of one that alone does not.
                tok.truncation_side = "left"
                tok.model_max_length = max_length
        except (OSError, ValueError, KeyError) as e:
            msg = " ".join(str(e).split())[:300]
            raise HHRLHFError(f"cannot load backbone {backbone!r}: {msg}") from None
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None)
        if positions is not None and max_length > positions:
            raise HHRLHFError(f"max_length {max_length} exceeds the {positions} positions of "
                              f"backbone {backbone!r}")
        if len(tok) > net.get_input_embeddings().num_embeddings:
            raise HHRLHFError(f"tokenizer has {len(tok)} tokens, the backbone's embedding "
                              f"{net.get_input_embeddings().num_embeddings}")
        if pooling == "auto":  # the pooling transformers computes itself (see the module doc)
            pooling = "last" if is_decoder_config(config) else "cls"
        if disable_dropout:
            for m in net.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        return cls(RewardNet(net, pooling, last_layer_readout), tok, max_length,
                   shared_context)

    @classmethod
    def _load(cls, folder: Path) -> NeuralPreferenceModel:
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        marker = json.loads((folder / MARKER_FILE).read_text())
        # Folders saved before the layout was recorded are sequence-classification folders.
        split = marker.get("layout") == LAYOUT_BACKBONE_AND_HEAD
        source = folder / BACKBONE_DIR if split else folder
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(source)
                # backbone/ holds the AutoModel weights: the head is filled in from its file
                net = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=1, dtype=torch.float32,
                    attn_implementation=marker.get("attn_implementation", "sdpa"))
                if split:
                    getattr(net, head_name(net)).load_state_dict(load_file(folder / HEAD_FILE))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            msg = " ".join(str(e).split())[:300]
            raise HHRLHFError(f"cannot load model: {msg}", folder) from None
        net.eval()
        # as from_backbone saves it now (folders saved before kept the tokenizer's defaults)
        tok.truncation_side, tok.model_max_length = "left", int(marker["max_length"])
        pm = cls(RewardNet(net, marker["pooling"]), tok, marker["max_length"],
                 marker.get("shared_context", True), marker.get("precision", "auto"))
        # scoring where it is fastest: `hhrlhf pm score`, `pm eval` and the API alike
        return pm.to("cuda") if torch.cuda.is_available() else pm

    @property
    def transformers_loadable(self) -> bool:
        """Whether ``AutoModelForSequenceClassification`` computes this model's rewards, so the
        saved folder is one (see :func:`transformers_computes`)."""
        return transformers_computes(self.pooling, self.is_decoder)

    def save(self, path: str | Path, state_dict: dict[str, Any] | None = None) -> None:
        """The model as a folder with ``hhrlhf_pm.json``; atomic. Where transformers computes
        the pooling, a transformers ``AutoModelForSequenceClassification`` folder (config,
        weights, tokenizer); otherwise ``backbone/`` (an ``AutoModel`` folder and the
        tokenizer) and ``value_head.safetensors``, beside a ``config.json`` that transformers
        refuses, so that no tool loads it as a sequence classifier that computes other rewards.

        ``state_dict``: the RewardNet's weights when they live elsewhere (gathered from a
        sharded FSDP/DeepSpeed model); keys start with ``net.``."""
        from safetensors.torch import save_file

        # the folder is removed on any failure (a full disk): nothing half-written is left
        with atomic_folder(path) as tmp:
            net: Any = self.reward_net.net
            net_state = None
            if state_dict is not None:
                from hhrlhf.runs import inner_state

                net_state = inner_state(state_dict)
            with quiet_transformers():
                if self.transformers_loadable:
                    net.save_pretrained(tmp, state_dict=net_state)
                    self.tokenizer.save_pretrained(tmp)
                else:
                    weights = net_state if net_state is not None else net.state_dict()
                    base, head = f"{net.base_model_prefix}.", f"{head_name(net)}."
                    net.base_model.save_pretrained(tmp / BACKBONE_DIR, state_dict={
                        k[len(base):]: v for k, v in weights.items() if k.startswith(base)})
                    self.tokenizer.save_pretrained(tmp / BACKBONE_DIR)
                    save_file({k[len(head):]: v.detach().contiguous().cpu() for k, v in
                               weights.items() if k.startswith(head)}, str(tmp / HEAD_FILE))
                    # A config no transformers class takes: whoever loads the folder with
                    # transformers (TRL, OpenRLHF) is stopped with this model type in the message.
                    (tmp / "config.json").write_text(json.dumps({
                        "model_type": f"hhrlhf {self.pooling}-pooled preference model: not an "
                                      "AutoModelForSequenceClassification, load it with "
                                      "hhrlhf.pm.load (see hhrlhf_pm.json)"}, indent=2) + "\n")
            reward = _REWARD_DOC[self.pooling] if self.transformers_loadable else (
                _HHRLHF_ONLY_DOC[self.pooling])
            write_marker(
                tmp, self.kind, pooling=self.pooling, max_length=self.max_length,
                shared_context=self.shared_context, decoder=self.is_decoder,
                attn_implementation=getattr(net.config, "_attn_implementation", "sdpa"),
                precision=self.precision,
                layout=LAYOUT_SEQUENCE_CLASSIFICATION if self.transformers_loadable
                else LAYOUT_BACKBONE_AND_HEAD,
                # The one class that computes these rewards, or None: only hhrlhf.pm.load does.
                transformers_class="AutoModelForSequenceClassification"
                if self.transformers_loadable else None,
                reward=reward,
            )

    # -- scoring -----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "no"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        """One reward per dialogue, in batches sorted by length."""
        enc = self.encoder.encode_dialogues(dialogues)
        out = np.zeros(len(enc), dtype=np.float32)
        with self._eval():
            for idx in sorted_batches(enc.lengths, batch_size):
                batch = collate_sequences([enc.row(i) for i in idx], self.pad_id)
                out[idx] = self._rewards(batch)
        return out

    def score_texts(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score([Dialogue.parse(t) for t in texts], batch_size)

    def score_pairs(self, comparisons: Sequence[Comparison], batch_size: int = 32
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(chosen rewards, rejected rewards); decoders score each pair's context once."""
        return self.score_encoded_pairs(self.encoder.encode_pairs(comparisons), batch_size)

    def score_encoded_pairs(self, pairs: EncodedPairs, batch_size: int = 32,
                            shared_context: bool | None = None, net: nn.Module | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of pairs encoded already. ``net``: the same RewardNet as wrapped for
        training (DDP/FSDP), to score through the wrapper."""
        packed = self.shared_context if shared_context is None else shared_context
        if packed and not self.packs_exactly:
            raise HHRLHFError("shared-context scoring would change this model's scores: "
                              + (self.packing_problem or "it is not a decoder read at the "
                                 "final token"))
        n = len(pairs)
        chosen = np.zeros(n, dtype=np.float32)
        rejected = np.zeros(n, dtype=np.float32)
        per_batch = max(1, batch_size // 2)  # two dialogues per pair
        lengths = pairs.packed_len if packed else np.maximum(pairs.chosen_len,
                                                              pairs.rejected_len)
        with self._eval():
            for idx in sorted_batches(lengths, per_batch):
                if packed:
                    batch = collate_packed(pairs, idx, self.pad_id)
                else:
                    batch = collate_pairs_full(pairs, idx, self.pad_id)
                r = self._rewards(batch, net)
                chosen[idx], rejected[idx] = r[: len(idx)], r[len(idx) :]
        return chosen, rejected

    def score_groups(self, prompts: Sequence[Dialogue | Sequence[Turn]],
                     responses: Sequence[Sequence[Turn | str]], batch_size: int = 32,
                     shared_context: bool | None = None, per_row: int = 0) -> np.ndarray:
        """(prompts, N) rewards of N responses per prompt. A decoder that packs exactly scores
        a prompt's responses in a packed row ``[prompt, r1, ..., rN]`` (block-causal mask,
        positions restarted per response, :func:`hhrlhf.packing.collate_shared`), read at each
        response's final token; any other model scores the N full rows in batches.

        ``per_row``: responses per packed row; 0 = the count that costs least
        (:func:`responses_per_row`): all N in one row for a model that is wide against the
        row, fewer (the prompt repeated once per row) when attention over a long row would
        cost more than the prompt tokens it saves."""
        group_dialogues(prompts, responses)  # checks the shapes
        packed = self.shared_context if shared_context is None else shared_context
        if packed and not self.packs_exactly:
            raise HHRLHFError("shared-context scoring would change this model's scores: "
                              + (self.packing_problem or "it is not a decoder read at the "
                                 "final token"))
        n = len(responses[0]) if responses else 0
        out = np.zeros((len(prompts), n), dtype=np.float32)
        if not n:
            return out
        groups = self.encoder.encode_groups(
            [p if isinstance(p, Dialogue) else Dialogue(tuple(p)) for p in prompts],
            [[as_turn(r) for r in g] for g in responses])
        # a group shares nothing when even its first token differs: full rows then
        can_pack = np.array([packed and len(s) > 0 for s in groups.shared])
        config = self.reward_net.net.config
        width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 768)
        rows: dict[int, list[tuple[int, int]]] = {}  # responses in the row -> (prompt, first)
        for i in map(int, np.flatnonzero(can_pack)):
            g = per_row or responses_per_row(len(groups.shared[i]), groups.own[i], width)
            for k0 in range(0, n, g):
                rows.setdefault(min(g, n - k0), []).append((i, k0))
        with self._eval():
            for g, starts in rows.items():
                parts = [(groups.shared[i], groups.own[i][k0 : k0 + g]) for i, k0 in starts]
                lens = np.array([len(p) + sum(len(x) for x in r) for p, r in parts])
                for idx in sorted_batches(lens, max(1, batch_size // g)):
                    r = self._group_rewards(collate_shared([parts[j] for j in idx],
                                                           self.pad_id))
                    for j, row in zip(idx, r):
                        i, k0 = starts[j]
                        out[i, k0 : k0 + g] = row
            flat = [(int(i), k) for i in np.flatnonzero(~can_pack) for k in range(n)]
            seqs = [groups.sequence(i, k) for i, k in flat]
            for idx in sorted_batches(np.array([len(x) for x in seqs]), batch_size):
                r = self._rewards(collate_sequences([seqs[j] for j in idx], self.pad_id))
                for j, v in zip(idx, r):
                    out[flat[j]] = v
        return out

    def _group_rewards(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Rewards (B, N) of packed rows, read at each response's final token."""
        net = self.reward_net
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        mask, select = batch["mask"], batch["ends"]
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
        h = net._read(select, mask[rows, 0, select][:, None], input_ids=batch["input_ids"],
                      attention_mask=net._backbone_mask(mask),
                      position_ids=batch["position_ids"])
        return net.head(h).squeeze(-1).float().cpu().numpy()  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        was_training = self.reward_net.training
        self.reward_net.eval()
        try:
            with torch.inference_mode(), self._autocast():
                yield
        finally:
            self.reward_net.train(was_training)

    def _rewards(self, batch: dict[str, torch.Tensor], net: nn.Module | None = None
                 ) -> np.ndarray:
        dev = self.device
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        return (net or self.reward_net)(batch).float().cpu().numpy()  # type: ignore[no-any-return]


def responses_per_row(prompt_len: int, own: Sequence[np.ndarray], width: int) -> int:
    """How many of a prompt's N responses one packed row should hold: the g whose rows cost
    least, a row of T = prompt + g responses costing ~ 6 * width * T (the linear layers, per
    token) + T^2 (attention under a block mask, computed in full). A wide model packs all N in
    one row; a narrow one with responses long against the prompt packs a few per row."""
    n = len(own)
    r = sum(len(x) for x in own) / max(n, 1)

    def cost(g: int) -> float:
        t = prompt_len + g * r
        return math.ceil(n / g) * (6 * width * t + t * t)

    return min(range(n, 0, -1), key=cost)  # ties: the larger g (fewer rows)


# Saved folders: a transformers sequence-classification folder, or backbone/ + value head.
LAYOUT_SEQUENCE_CLASSIFICATION = "sequence_classification"
LAYOUT_BACKBONE_AND_HEAD = "backbone_and_head"
BACKBONE_DIR = "backbone"
HEAD_FILE = "value_head.safetensors"

# What the reward is, in the marker, for a person who loads the folder without hhrlhf.
_REWARD_DOC = {
    "last": "AutoModelForSequenceClassification logits[:, 0] of the dialogue (read at its final "
            "token: the rightmost one that is not the pad token)",
    "cls": "AutoModelForSequenceClassification logits[:, 0]",
}
_HHRLHF_ONLY_DOC = {
    "mean": "value_head(mean of AutoModel(backbone/).last_hidden_state over attention_mask); "
            "AutoModelForSequenceClassification cannot compute it: load with hhrlhf.pm.load",
    "last": "value_head(AutoModel(backbone/).last_hidden_state at the final token); "
            "AutoModelForSequenceClassification cannot compute it: load with hhrlhf.pm.load",
}
