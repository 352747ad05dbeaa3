import json

import pytest

from diffpolicy.cli import main
from diffpolicy.data.episodes import EpisodeStore


def test_collect_writes_a_store_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    assert main(["collect", "--task", "trajectory2d", "--episodes", "3", "--out", str(out)]) == 0
    store = EpisodeStore.open(out)
    assert store.n_episodes == 3 and list(store.attrs["seeds"]) == [0, 1, 2]
    assert main(["collect", "--task", "trajectory2d", "--episodes", "3", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert EpisodeStore.open(out).n_episodes == 3  # untouched


def test_collection_seeds_may_not_reach_evaluation_seeds(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    assert (
        main(["collect", "--task", "trajectory2d", "--episodes", "3", "--seed", "100001", "--out", str(out)])
        == 2
    )
    assert "overlap the evaluation seeds" in capsys.readouterr().err


def test_collection_seeds_may_not_reach_validation_seeds(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    args = ["collect", "--task", "trajectory2d", "--episodes", "3", "--seed", "200005", "--out", str(out)]
    assert main(args) == 2
    assert "overlap the validation seeds (train.eval_seed) 200000..200009" in capsys.readouterr().err
    assert not out.exists()


def test_collection_may_start_right_after_the_evaluation_seeds(tmp_path):
    """The evaluation range is eval.seed .. eval.seed + n_episodes - 1: the next seed is free."""
    out = tmp_path / "d.zarr"
    args = ["collect", "--task", "trajectory2d", "--episodes", "2", "--out", str(out)]
    assert main([*args, "--seed", "100002", "eval.n_episodes=2"]) == 0
    assert list(EpisodeStore.open(out).attrs["seeds"]) == [100002, 100003]
    assert main([*args, "--seed", "100001", "eval.n_episodes=2", "--overwrite"]) == 2


def test_evaluation_seeds_inside_the_demonstrations_are_refused(tmp_path, capsys):
    """A store that records its seeds is checked against the evaluation ranges before any training."""
    data, run = tmp_path / "d.zarr", tmp_path / "run"
    assert (
        main(["collect", "--task", "trajectory2d", "--episodes", "3", "--seed", "10", "--out", str(data)])
        == 0
    )
    capsys.readouterr()
    tiny = [
        "train.num_steps=2",
        "train.batch_size=4",
        "policy.unet.down_dims=[8,16]",
        "policy.unet.n_groups=4",
    ]
    args = [
        "train",
        "--preset",
        "trajectory2d_lowdim_unet",
        "--run-dir",
        str(run),
        f"data.path={data}",
        *tiny,
    ]
    assert main([*args, "eval.seed=11", "eval.n_episodes=5", "eval.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "eval.seed=11" in err and "seeds 11, 12" in err and str(data) in err
    assert not run.exists()  # refused before the run folder is made
    assert main([*args, "train.eval_every=4", "train.eval_seed=0", "train.eval_episodes=20"]) == 2
    assert "train.eval_seed=0" in capsys.readouterr().err
    # 3 episodes kept from seeds 10..12: seed 13 on is unseen, and evaluating a checkpoint checks the same
    ckpt = run / "checkpoints" / "latest"
    assert main([*args, "eval.seed=13", "eval.n_episodes=1", "eval.max_steps=2"]) == 0
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e"), "eval.seed=12"]) == 2
    assert "eval.seed=12" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "command",
    [["eval", "--checkpoint", "ckpt"], ["distill", "--teacher", "ckpt"], ["serve", "--checkpoint", "c"]],
)
def test_commands_that_start_from_a_checkpoint_explain_why_they_take_no_preset(command, tmp_path, capsys):
    """README: collect / train / demo / bench take --preset; eval, serve and distill say why they do not
    (before looking for the checkpoint, and without making a run folder)."""
    assert main([*command, "--preset", "pusht_state_unet_cpu"]) == 2
    err = capsys.readouterr().err
    assert f"diffpolicy {command[0]} takes no --preset" in err and "config" in err
    run = tmp_path / "run"
    assert main(["distill", "--teacher", "ckpt", "--run-dir", str(run), "--preset", "x"]) == 2
    assert not run.exists()


def test_unknown_key_is_a_clear_error(capsys):
    assert main(["train", "--preset", "trajectory2d_lowdim_unet", "train.bach_size=3"]) == 2
    assert "unknown config key 'train.bach_size'" in capsys.readouterr().err


def test_train_then_eval(tmp_path, traj_store, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--run-dir",
        str(run),
        "--preset",
        "trajectory2d_lowdim_unet",
        f"data.path={traj_store}",
        "train.num_steps=8",
        "train.batch_size=16",
        "policy.unet.down_dims=[16,32]",
        "policy.unet.n_groups=4",
        "policy.scheduler.num_inference_steps=4",
        "--episodes",  # the final evaluation's episodes, as `eval --episodes` (README: "--episodes 20")
        "2",
        "eval.n_envs=2",
        "eval.max_steps=20",
    ]
    assert main(args) == 0
    assert "over 2 episodes" in capsys.readouterr().out
    assert json.loads((run / "eval" / "report.json").read_text())["n_episodes"] == 2
    out = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "checkpoints" / "latest"),
                "--episodes",
                "3",
                "--out",
                str(out),
                "eval.sampler=ddim",
                "eval.timestep_spacing=trailing",
                "eval.n_videos=1",
                "eval.temporal_ensemble=true",
                "eval.ensemble_decay=-0.5",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["n_episodes"] == 3 and report["sampler"] == "DDIMScheduler"
    assert report["temporal_ensemble"] and report["ensemble_decay"] == -0.5
    assert "temporal ensembling: True (decay -0.5)" in (out / "report.md").read_text()
    assert (
        report["timestep_spacing"] == "trailing" and "(trailing spacing)" in (out / "report.md").read_text()
    )
    assert any(v.endswith(".mp4") for v in report["videos"]) and any(
        v.endswith(".gif") for v in report["videos"]
    )
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "latest"), "policy.horizon=8"]) == 2


@pytest.mark.parametrize("argv", [["presets"]])
def test_presets_listed(argv, capsys):
    assert main(argv) == 0
    assert "trajectory2d_lowdim_unet" in capsys.readouterr().out


def test_overrides_may_surround_options(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    argv = ["collect", "collect.n_episodes=2", "--task", "trajectory2d", "--out", str(out), "collect.seed=5"]
    assert main(argv) == 0
    assert list(EpisodeStore.open(out).attrs["seeds"]) == [5, 6]
    with pytest.raises(SystemExit):
        main(["collect", "--bogus", "--out", str(out)])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--preset",
        "trajectory2d_lowdim_unet",
        "--batch-size",
        "4",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--out",
        str(out),
        "policy.unet.down_dims=[16,32]",
        "policy.unet.n_groups=4",
        "policy.scheduler.num_inference_steps=2",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "train_step_ms" in table and "chunk_ms[ddim-10]" in table
    row = json.loads(out.read_text())["rows"][0]
    assert row["train_step_ms"] > 0 and row["per_action_ms[ddpm-100]"] > 0
    assert (row["train_precision"], row["precision"], row["compile"]) == ("no", "fp32", "no")
    # the fast paths are selected by overrides and recorded in the row
    assert main(argv + ["train.mixed_precision=bf16", "eval.precision=bf16"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert (row["train_precision"], row["precision"]) == ("bf16", "bf16") and row["train_step_ms"] > 0


def test_bench_with_data_times_loading_too(tmp_path, traj_store):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "trajectory2d_lowdim_unet", "--data", str(traj_store), "--batch-size", "4"]
    argv += ["--warmup", "0", "--repeats", "1", "--out", str(out), "policy.unet.down_dims=[16,32]"]
    assert main(argv + ["policy.unet.n_groups=4"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["load_batch_ms"] > 0
    assert row["train_step_with_data_ms"] > 0 and row["train_samples_per_s_with_data"] > 0
