"""The trainer under a real torchrun: 2 CPU processes, FSDP2 (gloo), checkpoint, SIGKILL, resume."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from flamingo_data.train.config import StartError, parse_args
from tests.loader_data import solid_jpeg


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    sample = write_mmc4_sample(
        root / "src", n_shards=4, docs_per_shard=12, missing_rate=0.0, seed=3
    )
    convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        RunOptions(out_dir=str(root / "shards"), converter="mmc4"),
        execution=Execution(processes=1, progress=False),
    )
    return root / "shards"


def run_ok(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run to completion; on failure the assertion shows the processes' own error output, which
    check=True would have hidden behind a bare CalledProcessError."""
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stderr[-4000:]}"
    return run


def torchrun_command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--master-addr",
        "127.0.0.1",
        "-m",
        "flamingo_data.train",
        "--mmc4-shards",
        str(shards),
        "--run-dir",
        str(run_dir),
        "--fsdp",
        "--batch-size",
        "3",
        "--max-tokens",
        "160",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--seed",
        "1",
        "--log-keys",
        *extra,
    ]


def kill_torchrun(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers: each worker runs in a session of its own, so killing
    torchrun's process group alone leaves them training (and writing to the run dir)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == proc.pid:
            workers.append(int(stat.parent.name))
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def log_entries(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_parse_args_builds_datasets_and_weights() -> None:
    config = parse_args(
        [
            "--mmc4-shards",
            "a/{0..3}.tar",
            "--laion-shards",
            "b/",
            "--dataset",
            "conv=gpt:c/*.tar",
            "--loss-weights",
            "mmc4=1.0,laion=0.2",
            "--run-dir",
            "r",
        ]
    )
    assert [(d.name, d.kind, d.shards) for d in config.datasets] == [
        ("mmc4", "interleaved", "a/{0..3}.tar"),
        ("laion", "pair", "b/"),
        ("conv", "gpt", "c/*.tar"),
    ]
    assert config.loss_weights == {"mmc4": 1.0, "laion": 0.2}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (["--log-every", "0"], "--log-every must be at least 1"),
        (["--grad-accum", "0"], "--grad-accum must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--cross-attn-every-n-layers", "0"], "--cross-attn-every-n-layers must be at least 1"),
        (["--workers", "-1"], "--workers must not be negative"),
        (["--loss-weights", "mmc4=abc"], "--loss-weights wants NAME=NUMBER"),
        (["--loss-weights", "mcm4=0.5"], "--loss-weights names no dataset: mcm4"),
        (["--dataset", "mmc4=interleaved:b/"], "dataset name given twice: mmc4"),
        (["--dataset", "x=interleavd:b/"], "KIND must be one of"),
        (["--dataset", "x=b/"], "--dataset wants NAME=KIND:SPEC"),
        (["--lm", "hf:gpt2"], "--lm hf:gpt2 needs --tokenizer"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number"),
        (["--sim-threshold", "nan"], "--sim-threshold must be a finite number"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
        (["--loss-weights", "mmc4=nan"], "--loss-weights wants finite weights of 0 or more"),
        (["--loss-weights", "mmc4=-1"], "--loss-weights wants finite weights of 0 or more"),
    ],
)
def test_bad_options_are_usage_errors(extra: list[str], message: str, capsys) -> None:
    """Each of these crashed after a whole training step (modulo by zero, IndexError), trained
    nothing with exit 0 (--grad-accum 0), was silently ignored (a misspelt loss-weight name), or
    trained a Hugging Face LM on the built-in tokenizer's byte ids, which are other tokens to it."""
    with pytest.raises(SystemExit) as exc:
        parse_args(["--mmc4-shards", "a/", "--run-dir", "r", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_in_process_training_step_and_checkpoint(shards: Path, tmp_path: Path) -> None:
    from flamingo_data.train.trainer import main

    summary = main(
        [
            "--mmc4-shards",
            str(shards),
            "--run-dir",
            str(tmp_path),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "2",
            "--max-tokens",
            "160",
            "--precision",
            "bf16",
            "--gradient-checkpointing",
            "--grad-accum",
            "2",
            "--warmup-steps",
            "10",
        ]
    )
    assert summary["steps"] == 3
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # the caller's env is kept
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"
    logged = [e for e in log_entries(tmp_path) if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]
    # the rate each step used: a 10-step warmup gives step k the factor k / 11
    assert [e["lr"] for e in logged] == pytest.approx([1e-4 * k / 11 for k in (1, 2, 3)])


def test_the_cli_passes_the_trainer_its_options(shards: Path, tmp_path: Path, capsys) -> None:
    """``flamingo-data train --mmc4-shards ... --run-dir ...`` (the README's one-process command)
    was refused by the CLI's own parser as unrecognized arguments, and ``train --help`` showed the
    wrapper's help instead of the trainer's options."""
    from flamingo_data.cli import main as cli

    argv = ["train", "--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--steps", "1"]
    assert cli.main([*argv, "--batch-size", "2", "--max-tokens", "160"]) == 0
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000001"
    capsys.readouterr()
    with pytest.raises(SystemExit) as shown:
        cli.main(["train", "--help"])
    assert shown.value.code == 0
    assert "--loss-weights" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_model(shards: Path, tmp_path: Path) -> None:
    """A checkpoint holds only the trainable weights: the tiny encoders' frozen weights come from
    --seed, and --cross-attn-every-n-layers 2 silently loaded half of an every-layer checkpoint."""
    from flamingo_data.train.trainer import main

    def train(*extra: str) -> dict:
        return main(
            ["--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--batch-size", "2"]
            + ["--max-tokens", "160", "--checkpoint-every", "1", *extra]
        )

    train("--steps", "1")
    for changed, message in (
        (["--cross-attn-every-n-layers", "2"], "cross_attn_every_n_layers: 1 then, 2 now"),
        (["--seed", "5"], "seed: 0 then, 5 now"),
        (["--image-size", "48"], "image_size: 32 then, 48 now"),
    ):
        with pytest.raises(ValueError, match=message):
            train("--steps", "2", "--resume", *changed)
    assert train("--steps", "2", "--resume")["start_step"] == 1


@pytest.mark.slow
def test_resume_with_steps_below_the_checkpoint_is_refused(shards: Path, tmp_path: Path) -> None:
    """A checkpoint at step 2 resumed with --steps 1 trained nothing, saved nothing and exited 0:
    the lowered --steps was silently ignored."""
    from flamingo_data.train.trainer import main

    args = ["--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--batch-size", "2"]
    args += ["--max-tokens", "160"]
    main([*args, "--steps", "2"])
    with pytest.raises(ValueError, match="at step 2, past `steps` 1: pass `steps` 2 or more"):
        main([*args, "--steps", "1", "--resume"])
    assert main([*args, "--steps", "2", "--resume"])["start_step"] == 2


@pytest.mark.slow
def test_resume_with_more_steps_follows_the_longer_schedule(shards: Path, tmp_path: Path) -> None:
    """Step 3 of a run raised from --steps 2 to 4 trained at the old schedule's last rate (0 for
    cosine, a wasted step), not at step 3's rate of the 4-step schedule."""
    from flamingo_data.train.trainer import main

    args = ["--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--batch-size", "2"]
    args += ["--max-tokens", "160", "--lr", "1e-3", "--warmup-steps", "0"]
    main([*args, "--steps", "2"])
    main([*args, "--steps", "4", "--resume"])
    rates = [e["lr"] for e in log_entries(tmp_path) if "lr" in e]
    cosine = [0.5e-3 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert rates == pytest.approx(
        [0.5e-3 * (1 + math.cos(math.pi * s / 2)) for s in range(2)] + cosine[2:]
    )


@pytest.mark.slow
def test_stop_after_saves_a_checkpoint_the_resume_continues_from(
    shards: Path, tmp_path: Path
) -> None:
    """--stop-after 2 between checkpoints exited 0 without saving: --resume started over at step
    0 and the two steps were lost."""
    from flamingo_data.train.trainer import main

    def train(run_dir: Path, *extra: str) -> dict:
        args = ["--mmc4-shards", str(shards), "--run-dir", str(run_dir), "--batch-size", "2"]
        return main([*args, "--max-tokens", "160", "--log-keys", "--steps", "4", *extra])

    train(tmp_path / "whole")
    assert train(tmp_path / "cut", "--checkpoint-every", "3", "--stop-after", "2")["steps"] == 2
    assert train(tmp_path / "cut", "--resume")["start_step"] == 2
    whole = [e for e in log_entries(tmp_path / "whole") if "loss" in e]
    cut = [e for e in log_entries(tmp_path / "cut") if "loss" in e]
    assert [e["step"] for e in cut] == [1, 2, 3, 4]
    assert [(e["keys"], e["loss"], e["lr"]) for e in cut] == [
        (e["keys"], e["loss"], e["lr"]) for e in whole
    ]


@pytest.mark.slow
def test_resume_takes_this_runs_lr_and_weight_decay(shards: Path, tmp_path: Path) -> None:
    """The checkpoint's optimizer and scheduler state brought back its --lr and --weight-decay:
    new values given with --resume were silently ignored."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from flamingo_data.train.trainer import main

    args = ["--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--batch-size", "2"]
    args += ["--max-tokens", "160", "--warmup-steps", "0", "--schedule", "constant"]
    main([*args, "--steps", "1", "--lr", "1e-3", "--weight-decay", "0.1"])
    main([*args, "--steps", "2", "--resume", "--lr", "2e-3", "--weight-decay", "0.05"])
    assert [e["lr"] for e in log_entries(tmp_path) if "lr" in e] == [1e-3, 2e-3]
    dcp_to_torch_save(tmp_path / "checkpoints" / "step_0000002", tmp_path / "step_2.pt")
    groups = torch.load(tmp_path / "step_2.pt", weights_only=False)["optim"]["param_groups"]
    assert [(g["weight_decay"], g["initial_lr"]) for g in groups] == [(0.05, 2e-3), (0.0, 2e-3)]


def test_a_checkpoint_from_before_cross_attention_moved_is_refused_when_it_differs(
    tmp_path: Path,
) -> None:
    """Cross-attention moved to open_flamingo's blocks (n-1, 2n-1, ...): an older checkpoint with
    n > 1 holds other blocks and is refused by name; with n = 1 nothing moved and it resumes."""
    from flamingo_data.train.trainer import refuse_other_settings, run_settings

    args = ["--mmc4-shards", "s/", "--run-dir", str(tmp_path)]
    for every, refused in ((1, False), (2, True)):
        config = parse_args([*args, "--cross-attn-every-n-layers", str(every)])
        older = {k: v for k, v in run_settings(config).items() if k != "cross_attn_placement"}
        if refused:
            with pytest.raises(ValueError, match="cross_attn_placement: None then"):
                refuse_other_settings(tmp_path, older, config)
        else:
            refuse_other_settings(tmp_path, older, config)
        refuse_other_settings(tmp_path, run_settings(config), config)


def test_a_max_tokens_beyond_the_lm_positions_is_refused_before_training(
    shards: Path, tmp_path: Path
) -> None:
    """The tiny LM has 512 positions: a longer sample used to crash at its first occurrence."""
    from flamingo_data.train.trainer import main

    args = ["--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--steps", "1"]
    with pytest.raises(ValueError, match="`max_tokens` 513 is more than the language model's 512"):
        main([*args, "--max-tokens", "513"])
    assert not (tmp_path / "checkpoints").exists()


def test_a_refusal_at_start_is_one_line_and_exit_2_from_the_command_line(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a 20-line traceback and exit 1, unlike the bad options refused just before it."""
    from flamingo_data.cli.main import main as cli

    args = ["train", "--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--steps", "1"]
    assert cli([*args, "--max-tokens", "513"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flamingo-data: error: --max-tokens 513 is more than the language model's 512 positions"
    ]


def test_resume_with_other_workers_or_dataset_order_is_refused_in_one_line(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another --workers was a ValueError traceback (exit 1) after the weights had loaded; the
    datasets in another order resumed silently, each loader on the other's seed, so the resumed
    epoch repeated some samples and skipped others."""
    from flamingo_data.cli.main import main as cli

    def train(*datasets: str, extra: tuple[str, ...] = ()) -> int:
        args = ["train", "--run-dir", str(tmp_path), "--batch-size", "2", "--max-tokens", "160"]
        for name in datasets:
            args += ["--dataset", f"{name}=interleaved:{shards}"]
        return cli([*args, "--checkpoint-every", "1", *extra])

    assert train("a", "b", extra=("--steps", "1")) == 0
    capsys.readouterr()
    for datasets, extra, message in (
        (("a", "b"), ("--workers", "2"), "saved with 1 worker slots"),
        (
            ("b", "a"),
            (),
            "dataset 'b': loader state was saved for another stream (seed: 1 then, 0 now)",
        ),
    ):
        assert train(*datasets, extra=("--steps", "2", "--resume", *extra)) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("flamingo-data: error: checkpoint"), err
        assert message in err[0]
    assert train("a", "b", extra=("--steps", "2", "--resume")) == 0


def test_an_image_size_the_vision_encoder_does_not_take_is_refused_before_training(
    shards: Path, tmp_path: Path
) -> None:
    """A Hugging Face CLIP built for 64 px images with the default --image-size 32 used to fail at
    the first batch, after the loaders had started."""
    transformers = pytest.importorskip("transformers")
    from flamingo_data.train.trainer import main

    clip = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    transformers.CLIPVisionModel(clip).save_pretrained(tmp_path / "clip")
    run_dir = tmp_path / "run"
    args = ["--mmc4-shards", str(shards), "--run-dir", str(run_dir), "--steps", "1"]
    args += ["--vision", f"hf:{tmp_path / 'clip'}"]
    with pytest.raises(ValueError, match="`image_size` 32 does not fit .* pass `image_size` 64"):
        main(args)
    assert main([*args, "--image-size", "64"])["steps"] == 1


def test_resume_with_a_dangling_latest_pointer_is_an_error_not_a_fresh_start(
    tmp_path: Path,
) -> None:
    from flamingo_data.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None  # no checkpoint yet: start at step 0
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000040")
    with pytest.raises(StartError, match="names step_0000040, which is not there"):
        latest_checkpoint(tmp_path)


@pytest.mark.slow
def test_resume_with_more_processes_is_refused_by_every_rank(shards: Path, tmp_path: Path) -> None:
    """Rank 1 found no trainer_rank1.pt (FileNotFoundError) while rank 0 went on into dcp.load."""
    options = torchrun_command(shards, tmp_path, "--steps", "1")
    options = options[options.index("flamingo_data.train") + 1 :]  # the same run, one process
    run_ok([sys.executable, "-m", "flamingo_data.train", *options], timeout=120)
    resumed = subprocess.run(
        torchrun_command(shards, tmp_path, "--steps", "2", "--resume"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode != 0
    refusal = "flamingo-data: error: checkpoint "  # one line from each rank (exit 2)
    assert resumed.stderr.count(refusal) == 2, resumed.stderr[-3000:]
    assert "written by 1 processes and this run has 2" in resumed.stderr


@pytest.mark.slow
def test_torchrun_fsdp_loss_goes_down_on_a_fixed_batch(shards: Path, tmp_path: Path) -> None:
    run_ok(
        torchrun_command(shards, tmp_path, "--steps", "16", "--checkpoint-every", "100"),
        timeout=240,
    )
    summary = log_entries(tmp_path)[-1]["summary"]
    assert summary["fixed_batch_loss_end"] < 0.97 * summary["fixed_batch_loss_start"]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_exact_stream(shards: Path, tmp_path: Path) -> None:
    steps = ["--steps", "12", "--checkpoint-every", "3"]
    whole = tmp_path / "whole"
    run_ok(torchrun_command(shards, whole, *steps), timeout=240)
    expected = {e["step"]: e for e in log_entries(whole) if "loss" in e}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun_command(shards, killed, *steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while (
        not (pointer.exists() and pointer.read_text() == "step_0000003")
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    kill_torchrun(proc)
    resumed_from = int(pointer.read_text().removeprefix("step_"))
    assert resumed_from < 12, "the run finished before it was killed"

    resumed_run = subprocess.run(
        torchrun_command(shards, killed, *steps, "--resume"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    entries = log_entries(killed)
    assert entries[-1]["summary"]["start_step"] == resumed_from  # really resumed, not restarted
    start = (
        len(entries)
        - 1
        - entries[::-1].index(next(e for e in entries[::-1] if e.get("step") == resumed_from + 1))
    )
    after = {e["step"]: e for e in entries[start:] if "loss" in e}
    assert sorted(after) == list(range(resumed_from + 1, 13))
    for (
        step,
        entry,
    ) in after.items():  # the resumed run sees exactly the batches and losses of the whole run
        assert entry["keys"] == expected[step]["keys"]
        assert entry["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)


DDP_ROUND_TRIP = """
import sys, torch, torch.distributed as dist
from flamingo_data.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flamingo_data.loader import make_tokenizer
from flamingo_data.model import FlamingoConfig, build_flamingo
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(build_flamingo(FlamingoConfig(), make_tokenizer()))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
saved = model.module.resampler.latents.detach().clone()
save_checkpoint(sys.argv[1], 1, model, optimizer, {"step": 1})
with torch.no_grad():
    model.module.resampler.latents.add_(1.0)
state = load_checkpoint(latest_checkpoint(sys.argv[1]), model, optimizer)
assert state == {"step": 1}, state
assert torch.equal(model.module.resampler.latents, saved), "trainable weights not restored"
dist.destroy_process_group()
"""


def test_checkpoint_round_trip_under_ddp(tmp_path: Path) -> None:
    """Without --fsdp and >1 process the model is DDP-wrapped: its weights must still be saved."""
    run = subprocess.run(
        [sys.executable, "-c", DDP_ROUND_TRIP, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]


CRAFTED_METADATA = """
import pickle, sys, torch, torch.distributed as dist
from pathlib import Path
from flamingo_data.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flamingo_data.train.config import StartError
class Touch:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
model = torch.nn.Linear(2, 2)
optimizer = torch.optim.AdamW(model.parameters())
path = save_checkpoint(sys.argv[1], 1, model, optimizer, {"step": 1})
assert load_checkpoint(path, model, optimizer) == {"step": 1}  # DCP's own metadata loads
(path / ".metadata").write_bytes(pickle.dumps(Touch()))
try:
    load_checkpoint(latest_checkpoint(sys.argv[1]), model, optimizer)
except StartError as exc:
    print("refused:", exc)
dist.destroy_process_group()
"""


def test_a_crafted_checkpoint_metadata_is_refused_not_unpickled(tmp_path: Path) -> None:
    """dcp.load unpickles ``.metadata`` with plain pickle: a run folder from elsewhere ran the
    code in it on --resume (weights_only covered only the trainer state)."""
    marker = tmp_path / "ran"
    run = subprocess.run(
        [sys.executable, "-c", CRAFTED_METADATA, str(tmp_path / "run"), str(marker)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not marker.exists()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "refused:" in run.stdout and "io.open is not checkpoint metadata" in run.stdout


@pytest.mark.slow
def test_a_failing_rank_stops_the_run_instead_of_hanging_it(shards: Path, tmp_path: Path) -> None:
    """Rank A fails (its only shard is not a tar) while rank B waits in a collective: the run must
    end with A's error, not hang both ranks until the 30-minute process-group timeout."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a-00000.tar").write_bytes((shards / "shard_0-00000.tar").read_bytes())
    (mixed / "b-00000.tar").write_bytes(b"this is not a tar archive" * 100)
    command = torchrun_command(mixed, tmp_path / "run", "--steps", "2")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        kill_torchrun(proc)
        pytest.fail("one rank failed and the run hung instead of exiting")
    assert proc.returncode != 0
    assert "yields no usable sample" in stderr and "not_a_tar" in stderr


@pytest.mark.parametrize("flag", ["--laion-shards", "--gpt-shards"])
def test_a_kind_named_option_refuses_shards_of_another_kind(
    shards: Path, tmp_path: Path, flag: str, capsys
) -> None:
    """Interleaved shards given as pairs or GPT sequences: one line before any training, naming
    the option to use, instead of every sample rejected one by one."""
    from flamingo_data.cli.main import main as cli

    argv = ["train", flag, str(shards), "--run-dir", str(tmp_path / "run"), "--steps", "1"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds interleaved ones: give interleaved shards as --mmc4-shards" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("steps", "given", "warmup"),
    [(10, [], 1), (5, [], 0), (100, [], 10), (1000, [], 10), (10, ["--warmup-steps", "5"], 5)],
)
def test_warmup_fits_a_short_run(steps: int, given: list[str], warmup: int) -> None:
    """With the default, `train --steps 10` spent every step warming up (the loss stayed flat)."""
    argv = ["--mmc4-shards", "a/", "--run-dir", "r", "--steps", str(steps), *given]
    assert parse_args(argv).warmup_steps == warmup


def test_a_gpu_gets_uint8_batches_and_the_trainer_normalizes_them_as_the_loader_does(
    shards: Path,
) -> None:
    """On a GPU the loader delivers uint8 pixels and ``model_vision`` normalizes them on the
    device; the model then sees exactly the CPU path's float vision_x (run here on the CPU)."""
    import torch

    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
    from flamingo_data.train.trainer import loader_pixels, model_vision

    assert loader_pixels(torch.device("cuda", 0)) == "uint8"
    assert loader_pixels(torch.device("cpu")) == "float"
    spec = [DatasetSpec("d", str(shards))]
    batches = {
        pixels: next(iter(build_loader(spec, make_tokenizer(None), LoaderConfig(pixels=pixels))))
        for pixels in ("float", "uint8")
    }
    assert batches["uint8"]["vision_x"].dtype == torch.uint8
    cpu = torch.device("cpu")
    assert torch.equal(model_vision(batches["uint8"], cpu), model_vision(batches["float"], cpu))


def train_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``flamingo-data train ARGS`` in a process of its own (the command a user runs)."""
    command = [sys.executable, "-m", "flamingo_data", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_run_dir_that_holds_a_run_is_refused_without_resume(shards: Path, tmp_path: Path) -> None:
    """Training again into a run's dir appended to its log.jsonl and repointed ``latest``, and a
    later --resume continued the wrong run: without --resume it is one line and exit 2."""
    args = ["--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--batch-size", "2"]
    args += ["--max-tokens", "160"]
    first = train_cli(*args, "--steps", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    log, latest = (tmp_path / "log.jsonl").read_text(), tmp_path / "checkpoints" / "latest"
    assert latest.read_text() == "step_0000001"
    again = train_cli(*args, "--steps", "2")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"flamingo-data: error: --run-dir {tmp_path} already holds a run: pass --resume to"
        " continue it, or give a new --run-dir"
    ]
    assert (tmp_path / "log.jsonl").read_text() == log and latest.read_text() == "step_0000001"
    resumed = train_cli(*args, "--steps", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "starting a fresh run" not in resumed.stderr
    assert latest.read_text() == "step_0000002"
    assert [e["step"] for e in log_entries(tmp_path) if "loss" in e] == [1, 2]


def test_a_run_dir_with_only_a_log_is_a_run_too(shards: Path, tmp_path: Path, capsys) -> None:
    """A run stopped before its first checkpoint left log.jsonl: a fresh start there would mix two
    runs' lines in it."""
    from flamingo_data.cli.main import main as cli

    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    argv = ["train", "--mmc4-shards", str(shards), "--run-dir", str(tmp_path), "--steps", "1"]
    assert cli(argv) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_resume_on_a_new_run_dir_says_it_starts_fresh(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "new"
    args = ["--mmc4-shards", str(shards), "--run-dir", str(run_dir), "--batch-size", "2"]
    resumed = train_cli(*args, "--max-tokens", "160", "--steps", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    notes = [line for line in resumed.stderr.splitlines() if "starting a fresh run" in line]
    assert notes == [f"{run_dir} holds no checkpoint to resume: starting a fresh run"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000001"


def write_llava_source(folder: Path) -> Path:
    """A LLaVA-style JSON and its image folder: the input of a conversion, not shards."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.jpg").write_bytes(solid_jpeg((200, 10, 10)))
    item = {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"}]}
    (folder / "llava.json").write_text(json.dumps([item]))
    return folder / "llava.json"


@pytest.mark.parametrize(
    ("named", "option", "message"),
    [
        ("empty", "--mmc4-shards", "names no shard: give the .tar shards"),
        ("llava.json", "--mmc4-shards", "names {path}, a .json source file: training reads shards"),
        ("llava.json", "--dataset", "names {path}, a .json source file: training reads shards"),
        ("images/a.jpg", "--laion-shards", "names {path}, which is not a tar file"),
        ("json-folder", "--gpt-shards", "names no shard"),
    ],
)
def test_training_on_no_shards_or_a_source_file_is_one_line_and_exit_2(
    tmp_path: Path, named: str, option: str, message: str, capsys
) -> None:
    """A dataset naming no shard, or a source file instead of shards, is one line in the trainer's
    words, naming the flag, before the model is built or anything is written."""
    write_llava_source(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "json-folder").mkdir()
    (tmp_path / "json-folder" / "llava.json").write_text((tmp_path / "llava.json").read_text())
    path = str(tmp_path / named)
    given = ["--dataset", f"conv=auto:{path}"] if option == "--dataset" else [option, path]
    args = [*given, "--run-dir", str(tmp_path / "run"), "--steps", "1"]
    if named == "empty":  # one case as the user runs it; the others in this process (same code)
        refused = train_cli(*args)
        code, err = refused.returncode, refused.stderr
    else:
        from flamingo_data.cli.main import main as cli

        code, err = cli(["train", *args]), capsys.readouterr().err
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(f"flamingo-data: error: {option} ")
    assert message.format(path=path) in line
    assert not (tmp_path / "run").exists()


def test_loss_on_reaches_the_loader_of_a_conversation_dataset(tmp_path: Path) -> None:
    """The same converted conversations, the same initial weights: the loss over the assistant's
    turns alone is another number than the loss over the whole conversation."""
    from flamingo_data.cli.main import main as cli
    from flamingo_data.train.trainer import main

    write_llava_source(tmp_path)
    item = {
        "id": "2",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image> What colour is it?"},
            {"from": "gpt", "value": "Red, mostly."},
        ],
    }
    (tmp_path / "llava.json").write_text(json.dumps([item]))
    shards = tmp_path / "conv-shards"
    args = ["--json", str(tmp_path / "llava.json"), "--images", str(tmp_path / "images")]
    assert cli(["convert", "conversations", *args, "--out", str(shards), "--no-progress"]) == 0
    losses = {}
    for loss_on in ("assistant", "all"):
        summary = main(
            ["--dataset", f"conv=interleaved:{shards}", "--run-dir", str(tmp_path / loss_on)]
            + ["--steps", "1", "--batch-size", "1", "--max-tokens", "64", "--loss-on", loss_on]
        )
        losses[loss_on] = summary["fixed_batch_loss_start"]
    assert losses["assistant"] != pytest.approx(losses["all"])
    assert parse_args(["--mmc4-shards", "a/", "--run-dir", "r"]).loss_on == "assistant"
