"""The last decoder layer, run only where the reward is read.

A decoder reward model reads ONE hidden state per dialogue: the final token's (two per packed
pair). Every layer but the last must run at every position, since the next layer attends to
all of them. The last layer is different: only its keys and values are needed everywhere.
Its queries, attention output, output projection, MLP and the final norm matter only at the
read-out positions. Computing those there alone changes no score and no gradient (the tests
hold both equal to the full model); it only saves time.

What it saves: of a layer's matrix work (4d^2 for q, k, v, o and about 8d^2 for the MLP), all
but the 2d^2 of k and v, so about 5/6 of one layer. That is 21% of a 4-layer model, 7% of a
12-layer one and 3.5% of a 24-layer one; the saving shrinks with depth, unlike shared-context
scoring. ``AutoModelForSequenceClassification``, which TRL, OpenRLHF and DeepSpeed-Chat use,
runs the whole last layer, and the head, at every position.

How: a forward pre-hook on the last layer stops the backbone there (it raises). Embeddings,
masks, position embeddings and every earlier layer are transformers' own code, whatever the
architecture. This module then computes the last layer from its input, for the families
whose layer it knows: Llama-style layers (llama, mistral without a sliding window, qwen2
without one) and GPT-2. Any other backbone runs in full.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> the layer family this module computes
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
_LLAMA_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups",
               "scaling", "attention_dropout")
_GPT2_PARTS = ("ln_1", "attn", "ln_2", "mlp")
_GPT2_ATTN = ("c_attn", "c_proj", "head_dim", "embed_dim", "scaling", "attn_dropout",
              "resid_dropout")


def readout_family(backbone: nn.Module) -> str | None:
    """The family whose last layer :func:`readout` computes, or None (run the model in full)."""
    config: Any = backbone.config
    family = FAMILIES.get(config.model_type)
    if family is None or getattr(config, "_attn_implementation", "sdpa") not in ("sdpa",
                                                                                 "eager"):
        return None
    layers, final_norm = _layers(backbone, family)
    if layers is None or final_norm is None or not len(layers):
        return None
    layer = layers[-1]
    if family == "llama":
        attn = getattr(layer, "self_attn", None)
        ok = all(hasattr(layer, p) for p in _LLAMA_PARTS) and \
            all(hasattr(attn, a) for a in _LLAMA_ATTN) and \
            not hasattr(attn, "q_norm") and not hasattr(attn, "k_norm") and \
            getattr(config, "sliding_window", None) is None and \
            not getattr(config, "use_sliding_window", False)
        ok = ok and getattr(config, "partial_rotary_factor", 1.0) == 1.0
    else:
        attn = getattr(layer, "attn", None)
        ok = all(hasattr(layer, p) for p in _GPT2_PARTS) and \
            all(hasattr(attn, a) for a in _GPT2_ATTN) and \
            not getattr(config, "add_cross_attention", False) and \
            not getattr(config, "reorder_and_upcast_attn", False)
    return family if ok else None


def _layers(backbone: nn.Module, family: str) -> tuple[Any, Any]:
    if family == "llama":
        return getattr(backbone, "layers", None), getattr(backbone, "norm", None)
    return getattr(backbone, "h", None), getattr(backbone, "ln_f", None)


class _LastLayerReached(Exception):
    """Raised by the pre-hook: carries the last layer's input and keyword arguments."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]):
        super().__init__()
        self.hidden = hidden
        self.kwargs = kwargs


def _stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    raise _LastLayerReached(hidden, kwargs)


def readout(backbone: nn.Module, family: str, *, select: torch.Tensor, keys: torch.Tensor,
            **inputs: Any) -> torch.Tensor:
    """Final hidden states (after the final norm) at ``select``, shape (B, S, d).

    ``select``: (B, S) positions to read. ``keys``: bool (B, 1, S, T), which positions each
    read-out position attends to (its row of the attention mask). ``inputs``: what the
    backbone is called with (``input_ids``, ``attention_mask``, ``position_ids``...).
    """
    layers, final_norm = _layers(backbone, family)
    last = layers[-1]
    handle = last.register_forward_pre_hook(_stop, with_kwargs=True)
    try:
        backbone(**inputs, use_cache=False)
        raise AssertionError("the backbone never reached its last layer")
    except _LastLayerReached as reached:
        hidden, kwargs = reached.hidden, reached.kwargs
    finally:
        handle.remove()
    if family == "llama":
        out = _llama_layer(last, hidden, kwargs["position_embeddings"], select, keys)
    else:
        out = _gpt2_layer(last, hidden, select, keys)
    result: torch.Tensor = final_norm(out)
    return result


def _gather(x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at positions select (B, S) -> (B, S, ...)."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, select]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H * hd) -> (B, H, T, hd)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
            dropout: float, scale: float) -> torch.Tensor:
    """Attention of q (B, H, S, hd) over k, v (B, H, T, hd) -> (B, S, H * hd)."""
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=keys,
                                       dropout_p=dropout, scale=scale)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_layer(layer: Any, hidden: torch.Tensor, position_embeddings: tuple[
        torch.Tensor, torch.Tensor], select: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)  # (B, T, d): k and v need every position
    k = _heads(attn.k_proj(x), attn.head_dim)
    v = _heads(attn.v_proj(x), attn.head_dim)
    q = _heads(attn.q_proj(_gather(x, select)), attn.head_dim)  # (B, H, S, hd)
    cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in position_embeddings)  # (B, T, hd)
    # rotary position embedding, as Llama applies it (q * cos + rotate_half(q) * sin)
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    cos_q, sin_q = _gather(cos, select)[:, None], _gather(sin, select)[:, None]
    q = q * cos_q + _rotate_half(q) * sin_q
    groups = attn.num_key_value_groups  # grouped-query attention: share each k/v head
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    o = _attend(q, k, v, keys, attn.attention_dropout if attn.training else 0.0, attn.scaling)
    h = _gather(hidden, select) + attn.o_proj(o)
    out: torch.Tensor = h + layer.mlp(layer.post_attention_layernorm(h))
    return out


def _gpt2_layer(layer: Any, hidden: torch.Tensor, select: torch.Tensor, keys: torch.Tensor
                ) -> torch.Tensor:
    attn = layer.attn
    d = attn.embed_dim
    x = layer.ln_1(hidden)
    w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: y = x @ w + b, w is (d, 3d): q|k|v
    kv = torch.addmm(b[d:], x.reshape(-1, d), w[:, d:]).view(*x.shape[:2], 2 * d)
    k, v = (_heads(t, attn.head_dim) for t in kv.split(d, dim=2))
    xs = _gather(x, select)
    q = _heads(torch.addmm(b[:d], xs.reshape(-1, d), w[:, :d]).view(*xs.shape[:2], d),
               attn.head_dim)
    o = _attend(q, k, v, keys, attn.attn_dropout.p if attn.training else 0.0, attn.scaling)
    h = _gather(hidden, select) + attn.resid_dropout(attn.c_proj(o))
    out: torch.Tensor = h + layer.mlp(layer.ln_2(h))
    return out
