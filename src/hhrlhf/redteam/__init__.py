"""Red-team analytics: what the red-team attempts say about models of each type and size."""

from hhrlhf.redteam.analysis import (
    CellStats,
    Correlation,
    GroupStats,
    HarmfulTranscript,
    RedTeamAnalysis,
    RedTeamConfig,
    analyse,
    load_and_analyse,
    read_attempts,
    wilson_interval,
)

__all__ = [
    "CellStats", "Correlation", "GroupStats", "HarmfulTranscript", "RedTeamAnalysis",
    "RedTeamConfig", "analyse", "load_and_analyse", "read_attempts", "wilson_interval",
]
