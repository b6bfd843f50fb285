"""``train --init-from openflamingo:PATH`` and ``export-openflamingo`` on the command line, checked
against open_flamingo 2.0.1's own model; checkpoints of the model before it matched are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from flamingo_data.cli.main import main as cli
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.loader import make_tokenizer
from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from flamingo_data.train.config import StartError
from flamingo_data.train.export import load_run_model
from tests.openflamingo_parts import (
    LM_CONFIGS,
    batch,
    build_open_flamingo,
    import_open_flamingo,
    published_checkpoint,
    randomize_trainable,
    tiny_hf_clip,
    vit_from_hf_clip,
)

EVERY = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shards/, a tiny CLIP (clip/), Llama (lm/), GPT-2's tokenizer (tok/) and an OpenFlamingo
    checkpoint of open_flamingo's own model over them, as open_flamingo saves it (init.pt)."""
    root = tmp_path_factory.mktemp("openflamingo")
    sample = write_mmc4_sample(root / "src", n_shards=2, docs_per_shard=8, missing_rate=0.0)
    convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        RunOptions(out_dir=str(root / "shards"), converter="mmc4"),
        execution=Execution(processes=1, progress=False),
    )
    torch.manual_seed(0)
    tiny_hf_clip().save_pretrained(root / "clip")
    config = LM_CONFIGS["llama"]()
    config.vocab_size = 50257
    transformers.LlamaForCausalLM(config).save_pretrained(root / "lm")
    tokenizer = gpt2_tokenizer_from_package()
    tokenizer.save_pretrained(root / "tok")
    theirs = open_flamingo(root, tokenizer)
    randomize_trainable(theirs, seed=4)
    torch.save(published_checkpoint(theirs), root / "init.pt")
    return root


def open_flamingo(root: Path, tokenizer):
    """open_flamingo's model over the saved CLIP (as an open_clip tower) and LM."""
    clip = transformers.CLIPVisionModel.from_pretrained(root / "clip").eval()
    lm = transformers.AutoModelForCausalLM.from_pretrained(root / "lm").eval()
    tokens = (
        tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
        tokenizer.convert_tokens_to_ids("<image>"),
        len(tokenizer),
    )
    of = import_open_flamingo()
    return build_open_flamingo(of, "llama", vit_from_hf_clip(clip), EVERY, lm=lm, tokens=tokens)


def train_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--mmc4-shards",
        str(root / "shards"),
        "--run-dir",
        str(run_dir),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--max-tokens",
        "64",
        "--vision",
        f"hf:{root / 'clip'}",
        "--lm",
        f"hf:{root / 'lm'}",
        "--tokenizer",
        str(root / "tok"),
        "--cross-attn-every-n-layers",
        str(EVERY),
        *extra,
    ]


def test_train_from_an_openflamingo_checkpoint_then_export_it_for_open_flamingo(
    assets: Path, tmp_path: Path, capsys
) -> None:
    init = f"openflamingo:{assets / 'init.pt'}"
    assert cli(train_args(assets, tmp_path / "run", "--init-from", init)) == 0
    err = capsys.readouterr().err
    assert "note: `lang_encoder.lm_head.weight` is not in the checkpoint" in err
    out = tmp_path / "checkpoint.pt"
    assert cli(["export-openflamingo", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert f"wrote {out}:" in capsys.readouterr().out

    started, exported = torch.load(assets / "init.pt"), torch.load(out)
    assert set(exported) == set(started) | {"lang_encoder.lm_head.weight"}
    table = "lang_encoder.model.embed_tokens.weight"  # the LM's own rows stay frozen
    assert torch.equal(exported[table][:50257], started[table][:50257])
    assert not torch.equal(exported["perceiver.latents"], started["perceiver.latents"])

    tokenizer = make_tokenizer(str(assets / "tok"))
    theirs = open_flamingo(assets, tokenizer)
    assert theirs.load_state_dict(exported, strict=False).unexpected_keys == []
    ours, step = load_run_model(tmp_path / "run" / "checkpoints" / "step_0000001")
    assert step == 1
    data = batch(tokenizer=tokenizer)
    with torch.no_grad():
        mine = ours.eval()(**data)
        other = theirs(data["vision_x"], data["lang_x"], data["attention_mask"], data["labels"])
    assert (mine.logits - other.logits).abs().max() <= 1e-5
    assert (mine.loss - other.loss).abs() <= 1e-5

    # the LM's embedding rows came from --init-from, not the checkpoint: a resume needs it again
    capsys.readouterr()
    assert cli([*train_args(assets, tmp_path / "run"), "--steps", "2", "--resume"]) == 2
    assert "init_from: 'openflamingo:" in capsys.readouterr().err


def test_a_wrong_init_from_is_one_line_before_training(assets: Path, tmp_path, capsys) -> None:
    init = f"openflamingo:{assets / 'init.pt'}"
    args = train_args(assets, tmp_path / "run", "--init-from", init)
    args[args.index("--cross-attn-every-n-layers") + 1] = "1"
    assert cli(args) == 2
    lines = capsys.readouterr().err.splitlines()  # transformers' own progress bars aside
    err = [line for line in lines if line.startswith("flamingo-data:")]
    assert len(err) == 1 and "lacks `lang_encoder.model.layers.0.gated_cross_attn_layer." in err[0]
    assert "--cross-attn-every-n-layers is 1 here and the checkpoint was trained with 2" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert cli([*train_args(assets, tmp_path / "run"), "--init-from", str(assets)]) == 2
    assert "--init-from wants openflamingo:PATH" in capsys.readouterr().err


def test_a_checkpoint_holding_frame_embeddings_is_refused_on_resume(tmp_path: Path) -> None:
    """The resampler had per-frame embeddings open_flamingo lacks: a checkpoint holding them
    would resume with them silently dropped."""
    import torch.distributed.checkpoint as dcp

    from flamingo_data.train.checkpoint import check_model_keys

    dcp.save(
        {"model": {"resampler.latents": torch.zeros(2), "resampler.frame_embs": torch.zeros(8, 2)}},
        checkpoint_id=str(tmp_path / "step_0000005"),
    )
    latents = {"resampler.latents": (2,)}
    with pytest.raises(StartError, match=r"holds `resampler.frame_embs`, unlike this version"):
        check_model_keys(tmp_path / "step_0000005", latents)
    with pytest.raises(StartError, match=r"lacks `tokens.head`"):
        check_model_keys(
            tmp_path / "step_0000005",
            {**latents, "resampler.frame_embs": (8, 2), "tokens.head": (3, 2)},
        )
    with pytest.raises(StartError, match=r"holds another shape of `resampler.latents`"):
        check_model_keys(
            tmp_path / "step_0000005", {"resampler.latents": (4,), "resampler.frame_embs": (8, 2)}
        )
    check_model_keys(tmp_path / "step_0000005", {**latents, "resampler.frame_embs": (8, 2)})


def test_resuming_a_run_whose_checkpoint_holds_another_model_is_one_line(
    assets: Path, tmp_path: Path, capsys
) -> None:
    """A checkpoint of the resampler with frame embeddings, rewritten from a real run's."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    run_dir = tmp_path / "run"
    args = ["train", "--mmc4-shards", str(assets / "shards"), "--run-dir", str(run_dir)]
    assert cli([*args, "--steps", "1"]) == 0
    step = run_dir / "checkpoints" / "step_0000001"
    dcp_to_torch_save(step, tmp_path / "saved.pt")
    state = torch.load(tmp_path / "saved.pt")
    state["model"]["resampler.frame_embs"] = torch.zeros(8, 64)
    torch.save(state, tmp_path / "saved.pt")
    for member in step.glob("*.distcp"):
        member.unlink()
    torch_save_to_dcp(tmp_path / "saved.pt", step)
    capsys.readouterr()
    assert cli([*args, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds `resampler.frame_embs`, unlike this version's model" in err[0]
    assert "start a new --run-dir" in err[0]
