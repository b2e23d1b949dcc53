"""A policy: any transformers causal LM folder (or hub name) and its tokenizer.

Its chat format (:mod:`hhrlhf.policy.chat`) is settled when it loads: the HH text format
(``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, :data:`HH_CHAT_TEMPLATE`) for a tokenizer
without a chat template or under ``chat_format=hh`` (the HH template then installed, so a
policy a run saves renders HH), else the model's own chat template.

Offline there is no pretrained causal LM: :func:`init_tiny` builds a small Llama-shaped decoder
and a byte-level BPE tokenizer trained on the given dialogues, saved as an ordinary transformers
folder that :meth:`Policy.load` (and ``AutoModelForCausalLM``) loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hhrlhf.errors import HHRLHFError
from hhrlhf.policy.chat import HH_CHAT_TEMPLATE, set_chat_format
from hhrlhf.records import ASSISTANT_MARKER, HUMAN_MARKER

EOS_TOKEN = "<|endoftext|>"


class Policy:
    """A causal LM and its tokenizer. ``net`` is an ``AutoModelForCausalLM``."""

    def __init__(self, net: Any, tokenizer: Any):
        self.net = net
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise HHRLHFError("the tokenizer has no end-of-sequence token (eos_token)")
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else eos)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def config(self) -> Any:
        return self.net.config

    @classmethod
    def load(cls, path: str | Path, attn_implementation: str = "auto",
             dtype: torch.dtype = torch.float32, chat_format: str | None = "auto") -> Policy:
        """Load a causal LM folder (or, online, a hub id); one-line errors for anything else.
        ``chat_format`` (``auto``, ``hh``, ``template``) settles the format its tokenizer
        speaks (:func:`hhrlhf.policy.chat.set_chat_format`); None leaves the tokenizer as it
        is (a DPO or RL reference, read with the policy's tokenizer)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from hhrlhf.pm.config import resolve_backbone
        from hhrlhf.pm.model import is_decoder_config, quiet_transformers

        source = resolve_backbone(str(path))
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            raise HHRLHFError(f"cannot read the model config: {' '.join(str(e).split())[:200]}",
                              path) from None
        if getattr(config, "is_encoder_decoder", False) or not is_decoder_config(config):
            raise HHRLHFError(f"not a causal language model ({config.model_type}); a policy "
                              "needs a decoder such as Llama, GPT-2 or Qwen", path)
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            raise HHRLHFError(f"cannot load the tokenizer: {' '.join(str(e).split())[:200]}",
                              path) from None
        if chat_format is not None:
            set_chat_format(tok, chat_format, path)
        try:
            with quiet_transformers():
                net = AutoModelForCausalLM.from_pretrained(
                    source, dtype=dtype,
                    attn_implementation=None if attn_implementation == "auto"
                    else attn_implementation)
        except (OSError, ValueError, KeyError) as e:
            raise HHRLHFError(f"cannot load the causal LM: {' '.join(str(e).split())[:200]}",
                              path) from None
        embedding: Any = net.get_input_embeddings()
        rows = int(embedding.weight.shape[0])
        if len(tok) > rows:
            raise HHRLHFError(f"the tokenizer has {len(tok)} tokens, the model's embedding "
                              f"{rows}", path)
        return cls(net, tok)

    def check_length(self, tokens: int, what: str = "max_length") -> None:
        """Refuse sequences longer than the model has positions for."""
        positions = getattr(self.config, "max_position_embeddings", None) or getattr(
            self.config, "n_positions", None)
        if positions is not None and tokens > positions:
            raise HHRLHFError(f"{what} {tokens} exceeds the {positions} positions of the policy")

    def prompt_length(self, max_new_tokens: int, max_prompt_length: int = 0) -> int:
        """The prompt tokens a sampling command keeps: ``max_prompt_length`` when given (0 =
        512, or what the policy's positions leave beside ``max_new_tokens``), checked to fit
        with the responses; one line when they do not."""
        if not max_prompt_length:
            positions = getattr(self.config, "max_position_embeddings", None) or 1 << 30
            max_prompt_length = min(512, positions - max_new_tokens)
            if max_prompt_length < 4:
                raise HHRLHFError(f"--max-new-tokens {max_new_tokens} leaves no room for a "
                                  f"prompt in the policy's {positions} positions")
        self.check_length(max_prompt_length + max_new_tokens,
                          "--max-prompt-length + --max-new-tokens")
        return max_prompt_length

    def save(self, path: str | Path, state_dict: dict[str, Any] | None = None) -> None:
        """An ordinary transformers folder (config, weights, tokenizer); atomic."""
        from hhrlhf.atomic import atomic_folder
        from hhrlhf.pm.model import quiet_transformers

        with atomic_folder(path) as tmp, quiet_transformers():
            self.net.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)


@dataclass(frozen=True)
class TinyConfig:
    """The shape of the offline starting policy (Llama-shaped, tied embeddings)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` with the HH chat template; the two role
    markers are single tokens and ``<|endoftext|>`` ends a response."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(m, normalized=False) for m in (HUMAN_MARKER, ASSISTANT_MARKER)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, model_max_length=1 << 30)
    fast.chat_template = HH_CHAT_TEMPLATE
    return fast


def init_tiny(texts: Iterable[str], out: str | Path, config: TinyConfig | None = None
              ) -> Policy:
    """Build the tiny starting policy from training dialogues and save it at ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config or TinyConfig()
    tok = train_tokenizer(texts, cfg.vocab_size)
    shape = {k: v for k, v in asdict(cfg).items() if k not in ("seed", "vocab_size")}
    lcfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       bos_token_id=None, **shape)
    torch.manual_seed(cfg.seed)
    policy = Policy(LlamaForCausalLM(lcfg), tok)
    policy.save(out)
    return Policy.load(out)
