"""hhrlhf: Anthropic's HH-RLHF preference and red-team data, fetched verified, read correctly,
audited, described, exported, and modelled."""

from hhrlhf.errors import HHRLHFError
from hhrlhf.read import read_comparisons, read_redteam, resolve
from hhrlhf.records import Comparison, Dialogue, RedTeamAttempt, Turn
from hhrlhf.registry import FILES, PREFERENCE_SUBSETS, SPLITS, SUBSETS, cache_dir

__all__ = [
    "FILES",
    "PREFERENCE_SUBSETS",
    "SPLITS",
    "SUBSETS",
    "Comparison",
    "Dialogue",
    "HHRLHFError",
    "RedTeamAttempt",
    "Turn",
    "cache_dir",
    "read_comparisons",
    "read_redteam",
    "resolve",
]
