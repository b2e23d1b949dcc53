"""Issue 16, part 1: no command destroys a model or a data file (hhrlhf.outputs, the one rule),
and the command-level items of part 5 (bad places to write, negative seeds and threads, device
settings, empty input): each one line, exit 2, nothing written.

Real parts only: a tiny policy and a lexical PM built from a few rows of the real file, the real
command line (in this process), real files, links and folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from policy_support import build_tiny, first_rows, one_thread, run_cli  # noqa: F401

from hhrlhf.errors import HHRLHFError
from hhrlhf.outputs import check_output_file, check_run_folder, mark_output, marker_path


@pytest.fixture(scope="module")
def models(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    root = tmp_path_factory.mktemp("models")
    build_tiny(first_rows(real_file, 40), root / "policy")
    LexicalPreferenceModel.fit(first_rows(real_file, 200)).save(root / "pm")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "\n\nHuman: How do I bake bread?"}) + "\n")
    return {"policy": root / "policy", "pm": root / "pm", "prompts": prompts}


def one_line(result: tuple[int, str, str], needle: str) -> str:
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hhrlhf: error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# -- trainers: --out never an input model folder, nor inside or around one ---------------------

def trainer_args(command: str, models: dict[str, Path], real_file: Path, out: Path
                 ) -> list[str]:
    pol, src = str(models["policy"]), str(real_file)
    steps = ["--max-steps", "1", "--out", str(out)]  # a regression trains one step, not an epoch
    return {
        "sft": ["sft", src, "--policy", pol, *steps],
        "dpo": ["dpo", src, "--policy", pol, *steps],
        "rl": ["rl", "--policy", pol, "--pm", str(models["pm"]), src, *steps],
        "pm train": ["pm", "train", src, "--backbone", pol, *steps],
    }[command]


@pytest.mark.parametrize("where", ["is", "is inside", "holds", "a symlink to"])
@pytest.mark.parametrize("command", ["sft", "dpo", "rl", "pm train"])
def test_a_run_is_never_written_into_or_around_an_input_model(
        command: str, where: str, models: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pol = models["policy"]
    before = snapshot(pol.parent)
    out = {"is": pol, "is inside": pol / "run", "holds": pol.parent}.get(where)
    if where == "a symlink to":
        out = tmp_path / "link"
        out.symlink_to(pol)
    assert out is not None
    line = one_line(run_cli(trainer_args(command, models, real_file, out), capsys,
                            monkeypatch), "an input folder; refusing to write a run there")
    assert f"{'is' if where == 'a symlink to' else where} {pol}" in line
    assert snapshot(pol.parent) == before  # the model, its config.json above all, untouched


def test_an_interrupted_run_is_not_replaced_by_a_new_one(
        models: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # killed before its first checkpoint: its settings and metrics, no checkpoint, no model
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"lr": 0.001}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = snapshot(run)
    for command in ("sft", "dpo", "rl", "pm train"):
        one_line(run_cli(trainer_args(command, models, real_file, run), capsys, monkeypatch),
                 "holds a run already; resume it (--resume) or choose another --out")
    assert snapshot(run) == before
    for name in ("config.json", "metrics.jsonl", "result.json", "checkpoints", "model"):
        other = tmp_path / f"only-{name}"
        other.mkdir()
        if name in ("checkpoints", "model"):
            (other / name).mkdir()
        else:
            (other / name).touch()
        with pytest.raises(HHRLHFError, match="holds a run already"):
            check_run_folder(other, resume=False)
        check_run_folder(other, resume=True)  # resuming it is what the message offers
    check_run_folder(tmp_path / "new" / "run", resume=False)  # a new folder is fine


def test_sft_out_naming_a_file_or_a_model_folder(
        models: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    one_line(run_cli(["sft", str(real_file), "--init", "tiny", "--out", str(notes)], capsys,
                     monkeypatch), f"{notes}: is a file; --out names a folder for a run")
    assert notes.read_text() == "mine\n"
    # a model folder that is not an input of this run (the PM, given to sft) is refused too
    one_line(run_cli(["sft", str(real_file), "--init", "tiny", "--out", str(models["pm"])],
                     capsys, monkeypatch), "is a model folder; refusing to write a run into it")


# -- file outputs: the one rule ------------------------------------------------------------------

def test_generate_never_writes_over_its_model_its_prompts_or_a_foreign_file(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pol, prompts = models["policy"], models["prompts"]
    before = snapshot(pol.parent)
    base = ["generate", "--policy", str(pol), str(prompts), "--max-new-tokens", "2"]
    one_line(run_cli([*base, "-o", str(pol / "config.json")], capsys, monkeypatch),
             "is one of the inputs; refusing to write over it")
    one_line(run_cli([*base, "-o", str(prompts)], capsys, monkeypatch), "is one of the inputs")
    hard = tmp_path / "hard.jsonl"
    os.link(prompts, hard)
    one_line(run_cli([*base, "-o", str(hard)], capsys, monkeypatch), "is one of the inputs")
    one_line(run_cli([*base, "-o", str(pol / "samples.jsonl")], capsys, monkeypatch),
             "an input folder; refusing to write into it")
    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    one_line(run_cli([*base, "-o", str(readme)], capsys, monkeypatch),
             "exists and was not written by `hhrlhf generate`")
    assert readme.read_text() == "# my notes\n"
    assert snapshot(pol.parent) == before
    # its own earlier output it may replace, as often as it likes; once edited, never
    out = tmp_path / "samples.jsonl"
    for _ in range(2):
        code, _, err = run_cli([*base, "-o", str(out)], capsys, monkeypatch)
        assert code == 0, err
        assert json.loads(out.read_text())["prompt_id"] == "1"
    assert marker_path(out).is_file()
    with open(out, "a") as fh:
        fh.write('{"my": "row"}\n')
    one_line(run_cli([*base, "-o", str(out)], capsys, monkeypatch), "(or was changed since)")
    # nor the file of another command
    one_line(run_cli(["pm", "score", str(models["pm"]), str(prompts), "-o", str(out)], capsys,
                     monkeypatch), "was not written by `hhrlhf pm score`")


def test_bon_does_not_replace_a_users_preference_file(
        models: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the user's training data, in the very format bon writes
    train = tmp_path / "train.jsonl"
    rows = [{"chosen": c.chosen_raw, "rejected": c.rejected_raw}
            for c in first_rows(real_file, 3)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = train.read_bytes()
    one_line(run_cli(["bon", "--policy", str(models["policy"]), "--pm", str(models["pm"]),
                      str(real_file), "--max-prompts", "1", "-o", str(train)], capsys,
                     monkeypatch),
             "exists and was not written by `hhrlhf bon`")
    assert train.read_bytes() == before


def rl_run_folder(models: dict[str, Path], folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"policy": str(models["policy"]),
                                                    "pm": str(models["pm"])}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.1, "kl": 0.0}\n')
    return folder


def writers(models: dict[str, Path], tmp_path: Path) -> dict[str, list[str]]:
    """Each command that writes a file the user names, up to its output option."""
    pol, pm, prompts = str(models["policy"]), str(models["pm"]), str(models["prompts"])
    run = tmp_path / "rl-run"
    if not run.exists():
        rl_run_folder(models, run)
    return {
        "generate": ["generate", "--policy", pol, prompts, "--max-new-tokens", "2", "-o"],
        "bon": ["bon", "--policy", pol, "--pm", pm, str(models["prompts"].parent / "pairs.jsonl"),
                "-o"],
        "rl eval": ["rl", "eval", str(run), "-o"],
        "pm score": ["pm", "score", pm, prompts, "-o"],
    }


@pytest.fixture
def pairs_file(models: dict[str, Path], real_file: Path) -> Path:
    p = models["prompts"].parent / "pairs.jsonl"
    if not p.exists():
        p.write_text("".join(json.dumps({"chosen": c.chosen_raw, "rejected": c.rejected_raw})
                             + "\n" for c in first_rows(real_file, 2)))
    return p


@pytest.mark.parametrize("command", ["generate", "bon", "rl eval", "pm score"])
def test_bad_places_to_write_are_one_line_before_any_work(
        command: str, models: dict[str, Path], pairs_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = writers(models, tmp_path)[command]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    one_line(run_cli([*args, str(notes / "out.jsonl")], capsys, monkeypatch),
             f"cannot write here: {notes} is a file, not a folder")
    one_line(run_cli([*args, "/proc/hhrlhf-out.jsonl"], capsys, monkeypatch),
             "cannot write in /proc")
    one_line(run_cli([*args, "/dev/null"], capsys, monkeypatch),
             "exists and is not a regular file")
    one_line(run_cli([*args, str(tmp_path)], capsys, monkeypatch), str(tmp_path))  # a folder
    assert notes.read_text() == "mine\n"


def test_a_read_only_folder_is_one_line(models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; the /proc and under-a-file cases "
                    "test the same check")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for args in writers(models, tmp_path).values():
            if args[0] == "bon":
                continue  # needs the pairs file; the check is the same function
            one_line(run_cli([*args, str(locked / "out.jsonl")], capsys, monkeypatch),
                     f"cannot write in {locked}")
    finally:
        locked.chmod(0o755)


def test_the_rule_by_itself(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    # an empty file holds nothing to lose; a marker of another command proves nothing
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    check_output_file(empty, "export", inputs=[data])
    ours = tmp_path / "ours.jsonl"
    ours.write_text("x\n")
    mark_output(ours, "stats")
    check_output_file(ours, "stats")
    with pytest.raises(HHRLHFError, match="not written by `hhrlhf export`"):
        check_output_file(ours, "export")
    # into a model folder, even one that is not an input
    with pytest.raises(HHRLHFError, match="inside a model folder"):
        check_output_file(model / "out.jsonl", "export", inputs=[data])
    # a symlinked folder is the folder it points to
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(HHRLHFError, match="an input folder"):
        check_output_file(link / "out.jsonl", "export", inputs=[model])
    with pytest.raises(HHRLHFError, match="an input folder"):
        check_run_folder(str(link), False, [str(model)])


# -- part 5: seeds, threads, devices, option names, empty input ---------------------------------

@pytest.mark.parametrize("option", ["--seed", "--threads"])
def test_negative_seed_and_threads_are_refused_everywhere(
        option: str, models: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pol, pm, src = str(models["policy"]), str(models["pm"]), str(real_file)
    commands = {
        "--seed": [["generate", "--policy", pol, src], ["bon", "--policy", pol, "--pm", pm, src],
                   ["rl", "eval", str(tmp_path)], ["pm", "eval", pm, src], ["pm", "cv", src],
                   ["pm", "agree", pm], ["chat", "--policy", pol],
                   ["sft", src, "--init", "tiny"], ["pm", "train", src]],
        "--threads": [["generate", "--policy", pol, src], ["bon", "--policy", pol, "--pm", pm, src],
                      ["rl", "eval", str(tmp_path)], ["pm", "score", pm, src],
                      ["chat", "--policy", pol], ["policy", "serve", "--policy", pol],
                      ["dpo", src, "--policy", pol]],
    }[option]
    for args in commands:
        one_line(run_cli([*args, option, "-1"], capsys, monkeypatch),
                 f"invalid value for '{option}': -1 is not in the range x>=0")
    key = option.lstrip("-")
    for trainer in (["sft", src, "--init", "tiny"], ["dpo", src, "--policy", pol],
                    ["rl", "--policy", pol, "--pm", pm, src], ["pm", "train", src]):
        one_line(run_cli([*trainer, "--out", str(tmp_path / "run"), "--set", f"{key}=-1"],
                         capsys, monkeypatch), f"config {key}=-1: must be 0 or more")
    assert not (tmp_path / "run").exists()


def test_rl_names_the_key_it_refuses(models: dict[str, Path], real_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["rl", "--policy", str(models["policy"]), "--pm", str(models["pm"]), str(real_file),
            "--out",
            str(tmp_path / "run"), "--max-steps", "1"]
    one_line(run_cli([*base, "--k", "0", "--algo", "ppo"], capsys, monkeypatch),
             "config samples_per_prompt=0 (--n): must be at least 1")
    one_line(run_cli([*base, "--k", "1"], capsys, monkeypatch),
             "config samples_per_prompt=1 (--n): RLOO needs at least 2")
    # a GPU that is not there: CUDA absent, or one past the last
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:0"
    for key in ("ref_device", "pm_device"):
        one_line(run_cli([*base, "--set", f"{key}={missing}"], capsys, monkeypatch),
                 f"config {key}='{missing}': there ")
    one_line(run_cli([*base, "--set", "ref_device=gpu"], capsys, monkeypatch),
             "config ref_device='gpu': not a device")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["generate", "pm score"])
def test_empty_input_is_the_no_rows_error(
        command: str, models: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = (["generate", "--policy", str(models["policy"])] if command == "generate"
            else ["pm", "score", str(models["pm"])])  # the PM is the subject in the pm group
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n \n")
    out = tmp_path / "out.jsonl"
    one_line(run_cli([*args, str(empty), "-o", str(out)], capsys, monkeypatch),
             f"{empty}: no rows: the file is empty")
    one_line(run_cli([*args, str(blank)], capsys, monkeypatch),
             f"{blank}: no rows: the file holds only blank lines")
    one_line(run_cli(args, capsys, monkeypatch, stdin=""), "<stdin>: no rows: stdin is empty")
    assert not out.exists()


# -- folder outputs: figures, a saved baseline, the folds' runs -----------------------------------

def test_redteam_figures_replace_only_their_own_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from redteam_gen import write_redteam_file

    data = write_redteam_file(tmp_path / "rt.json.gz", n=120, seed=3).path
    figs = tmp_path / "figs"
    for _ in range(2):  # a second run replaces the figures of the first
        code, _, err = run_cli(["redteam", str(data), "--json", "--out", str(figs)], capsys,
                               monkeypatch)
        assert code == 0, err
    assert (figs / "tags.png").read_bytes().startswith(b"\x89PNG")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tags.png").write_bytes(b"my own picture")
    one_line(run_cli(["redteam", str(data), "--out", str(mine)], capsys, monkeypatch),
             "tags.png: exists and was not written by `hhrlhf redteam`")
    assert (mine / "tags.png").read_bytes() == b"my own picture"
    assert sorted(p.name for p in mine.iterdir()) == ["tags.png"]  # no figure written either


def test_pm_eval_and_cv_never_save_into_an_input(
        models: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pm = models["pm"]
    before = snapshot(pm)
    one_line(run_cli(["pm", "eval", str(pm), str(real_file), "--baseline-train", str(real_file),
                      "--save-baseline", str(pm)], capsys, monkeypatch),
             f"is {pm}, an input folder; refusing to write a model there")
    assert snapshot(pm) == before
    one_line(run_cli(["pm", "cv", str(real_file), "--set", f"backbone={models['policy']}",
                      "--out", str(models["policy"] / "folds")], capsys, monkeypatch),
             "an input folder; refusing to write the folds' runs there")


def test_a_subset_name_protects_its_cached_file(
        models: dict[str, Path], seeded_cache: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cached = seeded_cache / "data" / "harmless-base" / "test.jsonl.gz"
    before = cached.read_bytes()
    one_line(run_cli(["generate", "--policy", str(models["policy"]), "harmless-base/test", "-o",
                      str(cached)], capsys, monkeypatch), "is one of the inputs")
    assert cached.read_bytes() == before


def test_a_run_folder_where_its_model_is_meant_names_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hhrlhf rl --policy runs/sft --pm runs/pm` (the run folders, not their model/): one line
    saying which folder was meant, for the policy and for the PM, before anything loads."""
    from hhrlhf.cli import main

    runs = {}
    for name in ("sft", "pm"):
        run = tmp_path / "runs" / name
        (run / "model").mkdir(parents=True)
        (run / "config.json").write_text("{}")
        (run / "metrics.jsonl").write_text("")
        (run / "model" / "config.json").write_text('{"model_type": "llama"}')
        runs[name] = run
    for args, meant in ((["--policy", str(runs["sft"]), "--pm", str(runs["pm"])], runs["sft"]),
                        (["--policy", str(runs["sft"] / "model"), "--pm", str(runs["pm"])],
                         runs["pm"]),
                        (["score", str(runs["pm"])], runs["pm"])):
        command = ["pm", *args] if args[0] == "score" else ["rl", *args, "--out",
                                                              str(tmp_path / "rl")]
        with pytest.raises(SystemExit) as e:
            main(command)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert f"did you mean {meant / 'model'}?" in err
