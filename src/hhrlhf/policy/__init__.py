"""Policies: any causal LM (the HH text format or its own chat template), SFT, DPO, sampling."""

from hhrlhf.policy.chat import CHAT_FORMATS, HH_CHAT_TEMPLATE, ChatFormat
from hhrlhf.policy.model import Policy, TinyConfig, init_tiny

__all__ = ["CHAT_FORMATS", "HH_CHAT_TEMPLATE", "ChatFormat", "Policy", "TinyConfig", "init_tiny"]
