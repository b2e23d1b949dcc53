"""Policies: a causal LM in the HH chat format, SFT, DPO and fast sampling."""

from hhrlhf.policy.model import HH_CHAT_TEMPLATE, Policy, TinyConfig, check_chat_format, init_tiny

__all__ = ["HH_CHAT_TEMPLATE", "Policy", "TinyConfig", "check_chat_format", "init_tiny"]
