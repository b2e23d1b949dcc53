"""The nine official HH-RLHF files: names, pinned figures, and where the cache lives.

Every file is pinned here (from the published files), never read from elsewhere at run time, so
nothing is trusted on first use. A file is pinned by its size and SHA-256, by its git blob id
(the SHA-1 of ``b"blob <size>\0" + content``, what ``git hash-object FILE`` prints), or both;
``None`` marks a figure that is not known. harmless-base/train is known only by its git blob id
(it is a plain blob in Anthropic's repository); the red-team file by all three.
hhrlhf.fetch checks every figure that is pinned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFERENCE_SUBSETS: tuple[str, ...] = (
    "harmless-base",
    "helpful-base",
    "helpful-online",
    "helpful-rejection-sampled",
)
REDTEAM_SUBSET = "red-team-attempts"
SUBSETS: tuple[str, ...] = PREFERENCE_SUBSETS + (REDTEAM_SUBSET,)
SPLITS: tuple[str, ...] = ("train", "test")
# The default training data of dpo and rl: the four preference subsets' train splits (in this
# order, which --max-rows and the saved configurations of runs depend on).
PREFERENCE_TRAIN: tuple[str, ...] = ("harmless-base/train", "helpful-base/train",
                                     "helpful-rejection-sampled/train", "helpful-online/train")

HF_BASE_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/"
GITHUB_BASE_URL = "https://github.com/anthropics/hh-rlhf/raw/master/"


@dataclass(frozen=True)
class DataFile:
    """One published file: its subset, split (None for the red-team file) and pinned figures."""

    subset: str
    split: str | None
    path: str  # relative to the dataset root, e.g. "harmless-base/test.jsonl.gz"
    size: int | None
    sha256: str | None
    git_blob_sha1: str | None = None

    @property
    def name(self) -> str:
        return self.subset if self.split is None else f"{self.subset}/{self.split}"


def _f(subset: str, split: str | None, path: str, size: int | None, sha: str | None,
       blob: str | None = None) -> DataFile:
    return DataFile(subset, split, path, size, sha, blob)


FILES: tuple[DataFile, ...] = (
    _f("harmless-base", "train", "harmless-base/train.jsonl.gz", None, None,
       "df7c90b1bbd6093bda9c996e8aab9a46fa557dcf"),
    _f("harmless-base", "test", "harmless-base/test.jsonl.gz", 742801,
       "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
       "a616e6a27660ded23c5ce0e585a3e4cf0d761f0e"),
    _f("helpful-base", "train", "helpful-base/train.jsonl.gz", 16200131,
       "518a5bf288456fc9f3b7c980c54116fba0c52f274d3f4d344675d83e4058f6f4"),
    _f("helpful-base", "test", "helpful-base/test.jsonl.gz", 875191,
       "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b"),
    _f("helpful-online", "train", "helpful-online/train.jsonl.gz", 20127228,
       "0994d18b82083f5c084ce04071b683958a724df8c7215ab1d851986642d36a2a"),
    _f("helpful-online", "test", "helpful-online/test.jsonl.gz", 1053578,
       "39a475cc7e0df972902f8e3a0972726fce826ac65369bda8c671de4330c60a10"),
    _f("helpful-rejection-sampled", "train", "helpful-rejection-sampled/train.jsonl.gz", 25697148,
       "0cea2d2ab2187624ec1314e8cc6fb579f0fa987b3a33e8102b7556ed4d255f64"),
    _f("helpful-rejection-sampled", "test", "helpful-rejection-sampled/test.jsonl.gz", 1361231,
       "abc35dbc56015db1dae0faa484514ccbc3eee0133bfcd557fc69250619b028bb"),
    _f(REDTEAM_SUBSET, None, "red-team-attempts/red_team_attempts.jsonl.gz", 15483307,
       "4c7b0069991460f0064f279fd400b51f3f0095697d14d7793c49b0925f80814f",
       "618ca2d1f90bf6c95ae65ea93b90f5a8d013c36c"),
)


def files_for(subsets: list[str] | tuple[str, ...] | None = None,
              split: str | None = None) -> list[DataFile]:
    """The registry entries for these subsets (all when empty), optionally one split.

    The red-team file has no split; it is included whatever ``split`` says.
    """
    from hhrlhf.errors import HHRLHFError

    wanted = list(subsets) if subsets else list(SUBSETS)
    for s in wanted:
        if s not in SUBSETS:
            raise HHRLHFError(f"unknown subset {s!r}; known: {', '.join(SUBSETS)}")
    if split is not None and split not in SPLITS:
        raise HHRLHFError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return [
        f for f in FILES
        if f.subset in wanted and (split is None or f.split is None or f.split == split)
    ]


def cache_dir() -> Path:
    """``$HHRLHF_CACHE``, else the platform's user cache directory for hhrlhf."""
    env = os.environ.get("HHRLHF_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("hhrlhf"))


def cached_path(f: DataFile) -> Path:
    """Where a fetched file lives in the cache (same layout as the dataset)."""
    return cache_dir() / "data" / f.path
