"""A training run's integrity (hhrlhf.runs): non-finite settings refused, a diverging run stopped
at its last good checkpoint, checkpoints verified on resume (a damaged one falls back), one run
per folder, SIGTERM, a full disk and the temporaries of a killed save."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_support import (
    one_thread,  # noqa: F401  # autouse
    run_cli,
)

from hhrlhf.errors import HHRLHFError


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_settings_are_refused(value: str) -> None:
    from hhrlhf.policy.sft import SFTConfig
    from hhrlhf.rl.train import RLConfig
    from hhrlhf.runs import resolve_config

    for cls, key in ((SFTConfig, "lr"), (SFTConfig, "max_grad_norm"), (SFTConfig, "epochs"),
                     (RLConfig, "kl_coef")):
        with pytest.raises(HHRLHFError, match=f"config {key}: expected a finite number"):
            resolve_config(cls, None, {key: value, "policy": "p", "pm": "m"}, resume=False)
    with pytest.raises(HHRLHFError, match="config max_grad_norm=nan: expected a finite number"):
        SFTConfig(max_grad_norm=float("nan")).validate()  # built in Python: no coerce


def test_non_finite_sampling_temperatures_are_refused(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    for args in (["generate", str(tmp_path), "harmless-base/test", "--temperature", "nan"],
                 ["generate", str(tmp_path), "harmless-base/test", "--temperature", "inf"],
                 ["bon", str(tmp_path), str(tmp_path), "harmless-base/test",
                  "--temperature", "nan"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and "--temperature must be a finite number" in err, err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["sft", "harmless-base/test", "--lr", "inf", "--out",
                            str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 2 and "config lr: expected a finite number" in err, err
