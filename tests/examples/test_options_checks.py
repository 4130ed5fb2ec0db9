"""The shared options of the example scripts (``examples/training/options.py``), checked in ``parse_args``:
no prefix matching, one range check, and paths checked before any model loads (audit 3, items 10, 13, 14).

Parse-level only: no model is built (``--pretrained_model_name_or_path`` is not read by ``parse_args``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from tests.examples.example_modules import load_example, load_script

options = load_example("training.options")

SCRIPTS = (
    "sdxl_sim",
    "sdxl_mlcm",
    "sdxl_hyper_sd",
    "sdxl_lightning",
    "sdxl_diffusion2gan",
    "sdxl_ssd1b_kd",
    "flow_kd",
    "flow_ladd",
    "flow_tscd",
    "flow_dmd2",
)


def _parse(tmp_path: Path, *extra: str) -> argparse.Namespace:
    """The shared options alone (a parser with :func:`add_common_args` only), validated."""
    parser = options.add_common_args(argparse.ArgumentParser())
    argv = ["--pretrained_model_name_or_path", "unused", "--output_dir", str(tmp_path / "out"), *extra]
    return options.check_common_args(parser.parse_args(argv))


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_reads_an_abbreviated_flag(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's prefix matching read ``--learning_rat`` as ``--learning_rate`` (and an SDXL script read the
    flow scripts' ``--guidance`` as its ``--guidance_scale``): now an unknown flag, refused before any check."""
    script = load_example(name)
    argv = [
        "--pretrained_model_name_or_path",
        "unused",
        "--output_dir",
        str(tmp_path),
        "--learning_rat",
        "1e-4",
    ]
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert "unrecognized arguments: --learning_rat 1e-4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,argv",
    [
        ("evaluate", ["--num_prompt", "3"]),
        (
            "train_latent_lpips",
            ["--pretrained_vae", "v", "--bapps_dir", "b", "--output_dir", "o", "--lr_ste", "1"],
        ),
    ],
)
def test_the_other_scripts_refuse_abbreviations_too(
    name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate.py and train_latent_lpips.py build their own parsers: the same rule."""
    module = load_script(name)
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    assert f"unrecognized arguments: {' '.join(argv[-2:])}" in capsys.readouterr().err


def test_the_flow_guidance_flag_is_not_the_sdxl_guidance_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_example("sdxl_sim")
    argv = ["--pretrained_model_name_or_path", "unused", "--output_dir", str(tmp_path), "--guidance", "3.5"]
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert "unrecognized arguments: --guidance 3.5" in capsys.readouterr().err


def test_check_range_bounds_and_messages() -> None:
    ns = argparse.Namespace(a=0.0, b=1.0, c=None, d=float("nan"), e=2)
    options.check_range(ns, "a", low=0, high=1, high_open=True)  # closed low end
    options.check_range(ns, "c", low=0, low_open=True)  # an option left out passes
    options.check_range(ns, "e", low=1)
    with pytest.raises(ValueError, match=r"Expected --a > 0 \(why\), but got 0.0\."):
        options.check_range(ns, "a", low=0, low_open=True, why="why")
    with pytest.raises(ValueError, match=r"Expected --b in \[0, 1\), but got 1.0\."):
        options.check_range(ns, "b", low=0, high=1, high_open=True)
    options.check_range(ns, "b", low=0, high=1)  # closed high end
    with pytest.raises(ValueError, match=r"Expected --d >= 0, but got nan\."):
        options.check_range(ns, "d", low=0)
    with pytest.raises(ValueError, match=r"Expected --e <= 1, but got 2\."):
        options.check_range(ns, "e", high=1)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--learning_rate", "0", r"Expected --learning_rate > 0 \(0 trains nothing.*, but got 0.0"),
        ("--learning_rate", "-0.00001", r"Expected --learning_rate > 0 .*, but got -1e-05"),
        ("--adam_beta1", "1", r"Expected --adam_beta1 in \[0, 1\) .*, but got 1.0"),
        ("--adam_beta1", "-0.1", r"Expected --adam_beta1 in \[0, 1\) .*, but got -0.1"),
        ("--adam_beta2", "1.5", r"Expected --adam_beta2 in \[0, 1\) .*, but got 1.5"),
        ("--adam_weight_decay", "-0.01", r"Expected --adam_weight_decay >= 0 .*, but got -0.01"),
        ("--ema_decay", "1", r"Expected --ema_decay in \[0, 1\) .*, but got 1.0"),
        ("--ema_decay", "nan", r"Expected --ema_decay in \[0, 1\) .*, but got nan"),
        ("--checkpoints_total_limit", "-1", r"Expected --checkpoints_total_limit >= 0, but got -1"),
        ("--checkpointing_steps", "-5", r"Expected --checkpointing_steps >= 0, but got -5"),
        ("--max_train_steps", "0", r"Expected --max_train_steps >= 1, but got 0"),
    ],
)
def test_shared_numeric_options_are_range_checked(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    parent = ["--use_ema"] if flag == "--ema_decay" else []  # refused without it (its own test below)
    with pytest.raises(ValueError, match=message):
        _parse(tmp_path, *parent, flag, value)


def test_scripts_own_optimiser_options_get_the_same_bounds(tmp_path: Path) -> None:
    """``*learning_rate``, ``*adam_beta1/2``, ``*weight_decay`` of a script's own options (``--fake_learning_rate``,
    ``--discriminator_adam_beta2``...) are held to the shared options' bounds; ``None`` (left out) passes."""
    args = _parse(tmp_path)
    for name, value, message in [
        ("fake_learning_rate", -1e-6, r"--fake_learning_rate > 0"),
        ("stage2_learning_rate", 0.0, r"--stage2_learning_rate > 0"),
        ("discriminator_adam_beta2", 1.0, r"--discriminator_adam_beta2 in \[0, 1\)"),
        ("discriminator_weight_decay", -1.0, r"--discriminator_weight_decay >= 0"),
        ("target_ema_decay", 1.5, r"--target_ema_decay in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            options.check_optimizer_ranges(argparse.Namespace(**{**vars(args), name: value}))
    options.check_optimizer_ranges(argparse.Namespace(**{**vars(args), "discriminator_learning_rate": None}))
    options.check_optimizer_ranges(argparse.Namespace(**{**vars(args), "target_ema_decay": 1.0}))


def test_data_and_resume_paths_are_checked_before_any_model_load(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"Expected --prompts_file to be a text file .*typo.txt is not a file"
    ):
        _parse(tmp_path, "--prompts_file", str(tmp_path / "typo.txt"))
    with pytest.raises(ValueError, match=r"Expected --train_data_dir to be a folder of images, but .*typo"):
        _parse(tmp_path, "--train_data_dir", str(tmp_path / "typo"))
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "a.txt").write_text("a caption without its image")
    with pytest.raises(
        ValueError, match=r"Expected --train_data_dir .*no_images to hold images .* found none"
    ):
        _parse(tmp_path, "--train_data_dir", str(empty))
    with pytest.raises(ValueError, match=r"'checkpoint-500' .*is not one.*\(found: none\)"):
        _parse(tmp_path, "--resume_from_checkpoint", "checkpoint-500")
    with pytest.raises(ValueError, match=r"Expected --resume_from_checkpoint to be 'latest' or an existing"):
        _parse(tmp_path, "--resume_from_checkpoint", str(empty))  # a folder, not a checkpoint-N one
    # Accepted: an image in a sub-folder, a prompt file, "latest" with nothing to resume yet, a checkpoint.
    (empty / "sub").mkdir()
    (empty / "sub" / "b.PNG").write_bytes(b"")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    _parse(tmp_path, "--train_data_dir", str(empty), "--prompts_file", str(prompts))
    _parse(tmp_path, "--resume_from_checkpoint", "latest")
    (tmp_path / "out" / "checkpoint-7").mkdir(parents=True)
    assert (
        _parse(tmp_path, "--resume_from_checkpoint", "checkpoint-7").resume_from_checkpoint == "checkpoint-7"
    )


def test_checkpoint_defaults_keep_three_and_zero_turns_off(tmp_path: Path) -> None:
    args = _parse(tmp_path)
    assert (args.checkpointing_steps, args.checkpoints_total_limit) == (500, 3)
    args = _parse(tmp_path, "--checkpointing_steps", "0", "--checkpoints_total_limit", "0")
    assert (args.checkpointing_steps, args.checkpoints_total_limit) == (0, 0)


@pytest.mark.parametrize(
    ("flag", "value", "parent"),
    [
        ("--lora_rank", "8", "--use_lora"),
        ("--lora_alpha", "16", "--use_lora"),
        ("--ema_decay", "0.99", "--use_ema"),
        ("--ema_warmup", "none", "--use_ema"),
    ],
)
def test_an_option_without_its_flag_is_refused(tmp_path: Path, flag: str, value: str, parent: str) -> None:
    """``--lora_rank 8`` without ``--use_lora`` trained the full UNet without a word; likewise ``--ema_decay`` /
    ``--ema_warmup`` without ``--use_ema`` (nothing averaged). With the flag the value is kept."""
    message = f"{flag} applies only with {parent}, which this run does not use: add {parent} or drop {flag}."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(tmp_path, flag, value)
    kept = getattr(_parse(tmp_path, parent, flag, value), flag[2:])
    assert str(kept) == value or kept == float(value)


def test_the_flag_dependent_defaults_are_filled_under_their_flag(tmp_path: Path) -> None:
    """64, alpha = rank (scale 1), 0.9999 and the linear warm-up, as before; ``None`` where the flag is off
    (nothing reads them), and a second check changes nothing."""
    names = ("lora_rank", "lora_alpha", "ema_decay", "ema_warmup")
    values = lambda args: tuple(getattr(args, n) for n in names)  # noqa: E731
    assert values(_parse(tmp_path)) == (None, None, None, None)
    args = _parse(tmp_path, "--use_lora", "--use_ema")
    assert values(args) == (64, 64.0, 0.9999, "linear")
    assert values(options.check_common_args(args)) == (64, 64.0, 0.9999, "linear")  # idempotent
    assert values(_parse(tmp_path, "--use_lora", "--lora_rank", "8")) == (8, 8.0, None, None)
    assert values(_parse(tmp_path, "--use_lora", "--lora_alpha", "2")) == (64, 2.0, None, None)
    assert values(options.check_common_args(_parse(tmp_path))) == (None, None, None, None)


def test_the_checkpoints_record_the_filled_values(tmp_path: Path) -> None:
    """``step.json`` records the values the run used (64, not the parser's ``None``), so resuming with the same
    command line warns about nothing, and a changed rank is named."""
    checkpoints = load_example("training.checkpoints")
    args = _parse(tmp_path, "--use_lora", "--use_ema")
    recorded = checkpoints.run_options(args)
    assert (recorded["lora_rank"], recorded["lora_alpha"], recorded["ema_decay"]) == (64, 64.0, 0.9999)
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / checkpoints.CHECKPOINT_MARKER).write_text(json.dumps({"step": 1, "options": recorded}))
    assert checkpoints.compare_options(folder, _parse(tmp_path, "--use_lora", "--use_ema")) == {}
    changed = checkpoints.compare_options(
        folder, _parse(tmp_path, "--use_lora", "--lora_rank", "64", "--use_ema")
    )
    assert changed == {}
    changed = checkpoints.compare_options(
        folder, _parse(tmp_path, "--use_lora", "--lora_rank", "8", "--use_ema")
    )
    assert changed == {"lora_rank": (64, 8), "lora_alpha": (64.0, 8.0)}
