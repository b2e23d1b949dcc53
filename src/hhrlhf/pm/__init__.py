"""Preference models: a score for a dialogue such that the chosen response scores higher."""

from hhrlhf.pm.base import PreferenceModel, load

__all__ = ["PreferenceModel", "load"]
