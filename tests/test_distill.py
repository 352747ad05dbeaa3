"""Consistency distillation: the objective's pieces, a tiny teacher -> student run, sampling, errors."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from diffusers import DDIMScheduler
from torch.utils.data import default_collate

from diffpolicy.checkpoint import load_training_state, save_checkpoint
from diffpolicy.cli import main
from diffpolicy.config import ConfigError, DistillConfig
from diffpolicy.data.normalize import Normalizer
from diffpolicy.distill import (
    ConsistencyDistillation,
    DistillTrainer,
    DistributionMatching,
    TeacherError,
    clean_estimate,
    ddim_step,
    distill_config,
    load_teacher,
    teacher_solve,
)
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy, load_policy, make_policy, make_scheduler
from diffpolicy.training.trainer import ResumeMismatch, Trainer

SHAPE_META = {
    "obs": {"pos": {"shape": [2], "type": "low_dim"}, "vel": {"shape": [2], "type": "low_dim"}},
    "action": {"shape": [2]},
}
DISTILL = [
    "distill.num_steps=40",
    "distill.lr=3e-3",
    "policy.consistency.original_inference_steps=20",  # the configuration these thresholds were measured on
    "distill.warmup_steps=2",
    "train.log_every=1",
    "train.val_every=0",
    "train.checkpoint_every=20",
    "eval.n_episodes=2",
    "eval.n_envs=2",
    "eval.max_steps=24",
]


def build(*overrides: str):
    """A policy with random weights and a normalizer fitted to random data (actions in [-2, 4])."""
    cfg = tiny_config(*overrides)
    policy = make_policy(cfg.policy, SHAPE_META)
    g = torch.Generator().manual_seed(0)
    data = {
        "pos": torch.randn(500, 2, generator=g),
        "vel": torch.randn(500, 2, generator=g),
        "action": torch.rand(500, 2, generator=g) * 6 - 2,
    }
    fitted = Normalizer.fit(data, {"pos": "minmax", "vel": "minmax", "action": "minmax"})
    policy.normalizer.load_state_dict(fitted.state_dict())
    return policy, cfg


def obs_batch(B=3, To=2):
    g = torch.Generator().manual_seed(1)
    return {"pos": torch.randn(B, To, 2, generator=g), "vel": torch.randn(B, To, 2, generator=g)}


CONSISTENCY = ("policy.type=consistency", "policy.scheduler.sampler=consistency")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, traj_store) -> Path:
    """A tiny trajectory2d diffusion policy, trained the way test_trainer trains one."""
    run = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(f"data.path={traj_store}", "train.num_steps=60", "eval.n_episodes=2", "eval.n_envs=2")
    Trainer(cfg, run).fit()
    return run / "checkpoints" / "latest"


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, teacher) -> Path:
    run = tmp_path_factory.mktemp("student") / "run"
    assert main(["distill", "--teacher", str(teacher), "--run-dir", str(run), *DISTILL]) == 0
    return run


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_step_matches_diffusers(prediction):
    teacher, _ = build(f"policy.scheduler.prediction_type={prediction}")
    cond = teacher.global_cond(teacher.encode_obs(obs_batch()))
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(2)) * 2
    ddim = make_scheduler(teacher.cfg.scheduler, "ddim")
    ddim.set_timesteps(20)  # one step goes from t to t - 5
    for t in (99, 44, 9, 4):  # 4 -> -1: the clean end
        ours = ddim_step(teacher, x, torch.full((3,), t), torch.full((3,), t - 5), cond)
        expected = ddim.step(teacher.call_net(x, t, cond), t, x).prev_sample
        assert torch.allclose(ours, expected, atol=1e-5), t
    assert isinstance(ddim, DDIMScheduler)


def trailing_ddim(teacher, sample, cond, n):
    """The teacher's DDIM-n with trailing spacing (T - 1, ..., then the clean end) through diffusers."""
    teacher.set_sampler("ddim", n, "trailing")
    teacher.set_sampling_timesteps(torch.device("cpu"))
    for step in teacher.sampler.timesteps:
        sample = teacher.sampler.step(teacher.call_net(sample, step, cond), step, sample).prev_sample
    return sample


def v_teacher_student_batch():
    """A v-prediction teacher, a student started from it, and a batch of 3 (obs, clean chunk, noise)."""
    teacher, _ = build("policy.scheduler.prediction_type=v_prediction")
    student, _ = build(*CONSISTENCY, "policy.scheduler.prediction_type=v_prediction")
    student.load_state_dict(teacher.state_dict())
    x0 = torch.rand(3, 16, 2, generator=torch.Generator().manual_seed(6)) * 2 - 1
    noise = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(7))
    return teacher, student, obs_batch(), x0, noise


def test_teacher_solve_is_the_teachers_ddim_chain():
    """Each sample takes its own number of DDIM steps; all the way down from the top is DDIM-N sampling."""
    teacher, _ = build("policy.scheduler.prediction_type=v_prediction")
    cond = teacher.global_cond(teacher.encode_obs(obs_batch()))
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(4))
    t, steps = torch.tensor([99, 49, 19]), torch.tensor([10, 2, 2])  # k = 10: ends at -1, 29, -1
    x_u, u = teacher_solve(teacher, x, t, steps, 10, cond)
    assert u.tolist() == [-1, 29, -1]
    with pytest.raises(ValueError, match="start at t >= 0"):
        teacher_solve(teacher, x, t, torch.tensor([10, 2, 3]), 10, cond)
    for b in range(3):
        one, now = x[b : b + 1], t[b : b + 1]
        for _ in range(int(steps[b])):
            one, now = ddim_step(teacher, one, now, now - 10, cond[b : b + 1]), now - 10
        assert torch.allclose(x_u[b : b + 1], one, atol=1e-5), b
    # the distillation grid 99, 89, ..., 9 -> clean is DDIM's "trailing" spacing
    assert torch.allclose(x_u[:1], trailing_ddim(teacher, x[:1], cond[:1], 10), atol=1e-5)
    assert teacher.sampler.timesteps.tolist() == list(range(99, 0, -10))


def test_solver_substeps_solve_the_ode_finer():
    """solver_substeps=m: each grid step is m DDIM steps, so the top-to-clean solve is DDIM-(N m) trailing;
    the student's grid points stay where they are, and the finer solve changes the targets."""
    teacher, student, obs, x0, noise = v_teacher_student_batch()
    index, steps = torch.tensor([9, 3, 3]), torch.tensor([10, 1, 1])
    fine = ConsistencyDistillation(student, teacher, student, DistillConfig(solver_substeps=2))
    coarse = ConsistencyDistillation(student, teacher, student, DistillConfig())
    t, x_t, f_fine = fine.targets(obs, x0, noise, index, steps)
    _, _, f_coarse = coarse.targets(obs, x0, noise, index, steps)
    cond = teacher.global_cond(teacher.encode_obs(obs))
    assert torch.allclose(f_fine[:1], trailing_ddim(teacher, x_t[:1], cond[:1], 20), atol=1e-5)  # 99, 94, ..
    assert torch.equal(t, (index + 1) * 10 - 1)  # the student's grid points do not change with m
    assert not torch.allclose(f_fine, f_coarse, atol=1e-4)  # a finer solve is a different target
    for bad in ("distill.solver_substeps=3", "distill.solver_substeps=0"):
        with pytest.raises(ConfigError, match="must divide the grid step k = 10"):
            tiny_config("policy.consistency.original_inference_steps=10", bad)
    with pytest.raises(ConfigError, match="choose one"):
        tiny_config("distill.solver_substeps=2", "distill.top_target=ddim")


@pytest.mark.parametrize("span", ["one", "uniform", "full"])
def test_solver_span_draws(span):
    student, _ = build(*CONSISTENCY, "policy.consistency.original_inference_steps=10")
    loss = ConsistencyDistillation(student, student, student, DistillConfig(solver_span=span))
    drawn = loss.sample_training_noise(40000, torch.Generator().manual_seed(0), torch.device("cpu"))
    index, steps = drawn["grid_index"], drawn["solver_steps"]
    assert ((steps >= 1) & (steps <= index + 1)).all()
    if span == "one":
        assert (steps == 1).all()
    elif span == "full":
        assert torch.equal(steps, index + 1)
    else:  # every span from one step to the clean end, about equally often, at the top of the grid
        top = steps[index == 9]
        counts = torch.bincount(top, minlength=11)[1:]
        assert (counts > 0.85 * len(top) / 10).all(), counts
    # the draws after the noise and grid index leave those two as they were with span=one
    base = ConsistencyDistillation(student, student, student, DistillConfig())
    again = base.sample_training_noise(40000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(again["noise"], drawn["noise"]) and torch.equal(again["grid_index"], index)
    with pytest.raises(ConfigError, match="distill.solver_span"):
        tiny_config("distill.solver_span=all")
    with pytest.raises(ConfigError, match="distill.top_target"):
        tiny_config("distill.top_target=ddpm")


def test_full_span_targets_the_teachers_result(teacher, tmp_path):
    """With span=full the consistency target is the teacher's DDIM result: the target network is unused."""
    cfg = distill_config(teacher, [*DISTILL, "distill.solver_span=full"])
    trainer = DistillTrainer(cfg, tmp_path / "run")
    trainer._build_data()
    trainer._build_policy()
    loss = trainer.loss_module
    for p in loss.target.parameters():
        p.data.fill_(float("nan"))  # any use of the target network would poison the loss
    batch = default_collate([trainer.train_set[i] for i in range(16)])
    drawn = loss.sample_training_noise(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.isfinite(loss(batch, **drawn))
    loss.cfg.solver_span = "uniform"  # now some targets come from the (poisoned) target network
    drawn = loss.sample_training_noise(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (drawn["solver_steps"] <= drawn["grid_index"]).any()
    assert torch.isnan(loss(batch, **drawn))


def test_top_target_ddim_is_the_teachers_ddim_sampler():
    """top_target=ddim: at the top of the grid the student sees pure noise and its target is exactly the chunk
    the teacher's DDIM-N sampler (eval.sampler=ddim) makes from that noise; lower grid points as before."""
    teacher, student, obs, x0, noise = v_teacher_student_batch()
    B = x0.shape[0]
    index, steps = torch.tensor([9, 9, 4]), torch.ones(B, dtype=torch.long)
    plain = ConsistencyDistillation(student, teacher, student, DistillConfig())
    top = ConsistencyDistillation(student, teacher, student, DistillConfig(top_target="ddim"))
    assert top.ddim_start == 90 and plain.ddim_start is None
    t, x_t, f_target = top.targets(obs, x0, noise, index, steps)
    t0, x_t0, f_target0 = plain.targets(obs, x0, noise, index, steps)
    assert torch.equal(t, t0) and t.tolist() == [99, 99, 49]
    assert torch.equal(x_t[:2], noise[:2]) and torch.equal(x_t[2], x_t0[2])
    assert torch.allclose(f_target[2], f_target0[2]) and not torch.allclose(f_target[:2], f_target0[:2])
    teacher.set_sampler("ddim", 10)
    g = torch.Generator().manual_seed(7)  # predict_action's first draw is its initial noise
    chunk = teacher.predict_action(obs, generator=g)["action_pred"]
    assert torch.allclose(teacher.normalizer.normalize("action", chunk)[:2], f_target[:2], atol=1e-5)


def test_timestep_spacing():
    """DDIM-10 of 100: leading (the default) 90..0, trailing 99..9; consistency chains refuse a spacing."""
    teacher, _ = build()
    for spacing, first, last in ((None, 90, 0), ("leading", 90, 0), ("trailing", 99, 9), ("linspace", 99, 0)):
        teacher.set_sampler("ddim", 10, spacing)
        teacher.set_sampling_timesteps(torch.device("cpu"))
        assert (teacher.sampler.timesteps[0], teacher.sampler.timesteps[-1]) == (first, last), spacing
        assert teacher.timestep_spacing == (spacing or "leading")
    trailing, _ = build("policy.scheduler.timestep_spacing=trailing", "policy.scheduler.sampler=ddim")
    assert trailing.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="timestep_spacing 'middle'"):
        teacher.set_sampler("ddim", 10, "middle")
    with pytest.raises(ConfigError, match="eval.timestep_spacing"):
        tiny_config("eval.timestep_spacing=middle")
    student, _ = build(*CONSISTENCY)
    assert student.timestep_spacing is None
    with pytest.raises(ValueError, match="ddpm / ddim sampling only"):
        student.set_sampler("consistency", 1, "trailing")


def test_boundary_condition_and_sampler_checks():
    student, _ = build(*CONSISTENCY)
    x = torch.randn(3, 16, 2)
    cond = student.global_cond(student.encode_obs(obs_batch()))
    f0, _ = student.consistency_output(x, torch.zeros(3, dtype=torch.long), cond)
    assert torch.equal(f0, x)  # f(x, 0) = x
    f, x0 = student.consistency_output(x, torch.full((3,), 99), cond)
    assert not torch.allclose(f, x) and torch.allclose(f, x0, atol=1e-3)  # c_skip ~ 0 at high noise
    with pytest.raises(ValueError, match="sampler='consistency' only"):
        student.set_sampler("ddim", 10)
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        student.set_sampler("consistency", 11)
    teacher, _ = build()
    with pytest.raises(ValueError, match="needs a distilled policy"):
        teacher.set_sampler("consistency", 1)
    with pytest.raises(ConfigError, match="does not fit policy.type='diffusion'"):
        tiny_config("policy.scheduler.sampler=consistency")


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_sampling_shapes_calls_and_action_range(steps):
    student, _ = build(*CONSISTENCY)  # random weights: wild x0 estimates that clipping must contain
    student.eval().set_sampler("consistency", steps)
    calls = []
    student.net.register_forward_hook(lambda *a: calls.append(1))
    out = student.predict_action(obs_batch(), generator=torch.Generator().manual_seed(0))
    assert len(calls) == steps
    assert out["action"].shape == (3, 8, 2) and out["action_pred"].shape == (3, 16, 2)
    a = out["action_pred"]
    assert torch.isfinite(a).all()
    lo = student.normalizer.params["action"].input_min
    hi = student.normalizer.params["action"].input_max
    assert (a >= lo - 1e-2).all() and (a <= hi + 1e-2).all()
    assert a.std() > 0.1  # not collapsed to a constant


def test_multi_step_chain_spans_the_grid():
    """n-step chains start at the top of the distillation grid and end at its lowest point."""
    student, _ = build(*CONSISTENCY, "policy.consistency.original_inference_steps=10")
    for steps, chain in [(1, [99]), (2, [99, 9]), (3, [99, 59, 9]), (10, list(range(99, 0, -10)))]:
        student.set_sampler("consistency", steps)
        student.set_sampling_timesteps(torch.device("cpu"))
        assert student.consistency_chain() == chain
        assert student.sampler.timesteps.tolist() == chain


def test_distillation_lowers_its_loss(student_run):
    rows = [json.loads(line) for line in (student_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 40
    assert all("train/consistency_loss" in r and "train/denoise_loss" in r for r in rows if "train/loss" in r)
    consistency = [r["train/consistency_loss"] for r in rows if "train/loss" in r]

    def mean(xs):
        return sum(xs) / len(xs)

    # the consistency term is the objective's core; the total includes the (slower) denoising term
    assert mean(consistency[-8:]) < 0.75 * mean(consistency[:8]), consistency
    assert mean(losses[-8:]) < 0.85 * mean(losses[:8]), losses


def test_student_round_trips_and_evaluates(student_run, teacher, tmp_path, capsys):
    path = student_run / "checkpoints" / "latest"
    student = DiffusionPolicy.from_pretrained(path)
    assert isinstance(student, ConsistencyPolicy) and student.num_inference_steps == 1
    again, cfg = load_policy(path)
    assert cfg.distill.teacher == str(teacher.resolve()) and cfg.train.num_steps == 40
    assert "target" in load_training_state(path)  # the target network resumes too
    obs = {"pos": torch.zeros(2, 2, 2), "vel": torch.zeros(2, 2, 2)}
    for steps in (1, 3):
        student.set_sampler("consistency", steps)
        again.set_sampler("consistency", steps)
        a = student.predict_action(obs, generator=torch.Generator().manual_seed(5))["action"]
        b = again.predict_action(obs, generator=torch.Generator().manual_seed(5))["action"]
        assert torch.equal(a, b)
    # distillation changed the teacher's weights, but not its normalizer
    t_state, s_state = load_policy(teacher)[0].state_dict(), student.state_dict()
    assert any(not torch.equal(t_state[k], s_state[k]) for k in t_state if k.startswith("net."))
    assert all(torch.equal(t_state[k], s_state[k]) for k in t_state if k.startswith("normalizer."))
    for steps in ("1", "3"):
        out = tmp_path / f"eval{steps}"
        args = ["eval", "--checkpoint", str(path), "--out", str(out), f"eval.num_inference_steps={steps}"]
        assert main(args) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["sampler"] == "LCMScheduler" and report["num_inference_steps"] == int(steps)
        assert report["noise_scale"] == 1.0
    out = tmp_path / "eval_ns0"
    assert main(["eval", "--checkpoint", str(path), "--out", str(out), "eval.noise_scale=0"]) == 0
    assert json.loads((out / "report.json").read_text())["noise_scale"] == 0.0
    assert "noise scale 0.0" in (out / "report.md").read_text()
    assert "success" in capsys.readouterr().out


def test_bad_teachers_are_clear_errors(tmp_path, teacher, student_run, capsys):
    with pytest.raises(TeacherError, match="cannot load the teacher.*does not exist"):
        load_teacher(tmp_path / "nope")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text("format: [unclosed")
    with pytest.raises(TeacherError, match="corrupt"):
        load_teacher(corrupt)
    bc, cfg = build("policy.type=mse_bc")
    save_checkpoint(tmp_path / "bc", bc, cfg)
    with pytest.raises(TeacherError, match="MseBCPolicy, not a DiffusionPolicy"):
        load_teacher(tmp_path / "bc")
    with pytest.raises(TeacherError, match="already consistency-distilled"):
        load_teacher(student_run / "checkpoints" / "latest")
    assert main(["distill", "--teacher", str(tmp_path / "nope")]) == 2
    assert "cannot load the teacher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only policy.consistency"):
        distill_config(teacher, ["policy.unet.down_dims=[8,16]"])
    with pytest.raises(ConfigError, match="set by 'distill.num_steps'"):
        distill_config(teacher, ["train.num_steps=5"])


class Interrupted(Exception):
    pass


class KilledDistillation(DistillTrainer):
    def save_latest(self, step):
        super().save_latest(step)
        if step == 8:
            raise Interrupted


def test_distillation_resumes_exactly(tmp_path, teacher):
    cfg = distill_config(teacher, [*DISTILL, "distill.num_steps=16", "train.checkpoint_every=8"])
    DistillTrainer(cfg, tmp_path / "straight").fit()
    with pytest.raises(Interrupted):
        KilledDistillation(cfg, tmp_path / "resumed").fit()
    DistillTrainer(cfg, tmp_path / "resumed").fit()
    a = load_training_state(tmp_path / "straight" / "checkpoints" / "latest")
    b = load_training_state(tmp_path / "resumed" / "checkpoints" / "latest")
    for part in ("model", "target"):
        state_a = a[part] if part == "model" else a[part]["model"]
        state_b = b[part] if part == "model" else b[part]["model"]
        for key in state_a:
            assert torch.allclose(state_a[key], state_b[key], atol=1e-6), (part, key)


def test_v_teacher_starts_the_student_exactly():
    """The student reads its network as v: from a v-prediction teacher it starts as the teacher's exact
    denoiser; from an epsilon teacher only near t = 0 (the high-noise end is re-learned)."""
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(3))
    for kind in ("v_prediction", "epsilon"):
        teacher, _ = build(f"policy.scheduler.prediction_type={kind}")
        student, _ = build(*CONSISTENCY, "policy.scheduler.prediction_type=v_prediction")
        student.load_state_dict(teacher.state_dict())
        cond = teacher.global_cond(teacher.encode_obs(obs_batch()))
        for t in (99, 49, 0):
            tt = torch.full((3,), t)
            expected = teacher.predict_x0(teacher.call_net(x, tt, cond), x, tt)
            _, x0 = student.consistency_output(x, tt, cond)
            gap = (x0 - expected).abs().max().item()
            if kind == "v_prediction":
                assert gap < 1e-5, t
            else:  # v ~ epsilon only where abar ~ 1
                assert (gap < 1e-2) == (t == 0), (t, gap)


def test_init_student_fine_tunes_a_distilled_student(tmp_path, teacher, student_run):
    """distill.init_student starts the student (and so its target and exported EMA) from a distilled
    checkpoint instead of the teacher; anything else there is a named error."""
    init = student_run / "checkpoints" / "latest"
    still = ["distill.num_steps=1", "distill.lr=1e-12", "eval.n_episodes=0"]  # the weights barely move
    cfg = distill_config(teacher, [*DISTILL, *still, f"distill.init_student={init}"])
    DistillTrainer(cfg, tmp_path / "ft").fit()
    tuned, tuned_cfg = load_policy(tmp_path / "ft" / "checkpoints" / "latest")
    assert tuned_cfg.distill.init_student == str(init)
    init_state, t_state = load_policy(init)[0].state_dict(), load_policy(teacher)[0].state_dict()
    tuned_state = tuned.state_dict()
    for key, value in tuned_state.items():
        assert torch.allclose(value, init_state[key], atol=1e-6), key
    assert any(not torch.allclose(tuned_state[k], t_state[k]) for k in t_state if k.startswith("net."))

    def fails(path, match):
        cfg = distill_config(teacher, [*DISTILL, *still, f"distill.init_student={path}"])
        with pytest.raises(TeacherError, match=match):
            DistillTrainer(cfg, tmp_path / "failed").fit()

    fails(tmp_path / "nope", "cannot load distill.init_student")
    fails(teacher, "DiffusionPolicy, not a consistency-distilled student")
    other, other_cfg = load_policy(init)
    key = "normalizer.params.action.scale"
    other.state_dict()[key].mul_(2.0)  # the buffers are the state: statistics from other data
    save_checkpoint(tmp_path / "other", other, other_cfg)
    fails(tmp_path / "other", f"other normalizer statistics than the teacher's \\({key} differs\\)")


# ----- consistency trajectory distillation (distill.objective=ctm) -------------------------------------
CTM = (*CONSISTENCY, "policy.scheduler.prediction_type=v_prediction", "policy.consistency.ctm=true")


def test_ctm_student_starts_as_the_teachers_ddim_jump():
    """A CTM student built from a v teacher's weights jumps from t to any s exactly as the teacher's
    (unclipped) DDIM step would: the stop-time encoder starts at zero. G(x, t, t) = x."""
    teacher, _ = build("policy.scheduler.prediction_type=v_prediction")
    student, _ = build(*CTM, "policy.consistency.original_inference_steps=10")
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("net.stop_step_encoder.") for k in missing)
    cond = teacher.global_cond(teacher.encode_obs(obs_batch()))
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([99, 59, 9])
    x0 = teacher.predict_x0(teacher.call_net(x, t, cond), x, t)
    for s in ([89, 19, -1], [-1, -1, -1], [99, 59, 9]):
        s = torch.tensor(s)
        G, g = student.jump(x, t, s, cond)
        assert torch.allclose(g, x0, atol=1e-5)
        assert torch.allclose(G, teacher.ddim_jump(x, x0, t, s), atol=1e-5)
    assert torch.allclose(student.jump(x, t, t, cond)[0], x, atol=1e-5)
    with pytest.raises(ValueError, match="needs a CTM student"):
        teacher_like, _ = build(*CONSISTENCY, "policy.scheduler.prediction_type=v_prediction")
        teacher_like.jump(x, t, t, cond)


def test_ctm_network_needs_its_stop_time_and_no_other_takes_one():
    student, _ = build(*CTM)
    plain, _ = build(*CONSISTENCY)
    x, cond = torch.zeros(3, 16, 2), student.global_cond(student.encode_obs(obs_batch()))
    with pytest.raises(ValueError, match="stop_timestep is required"):
        student.net(x, 9, global_cond=cond)
    with pytest.raises(ValueError, match="stop_timestep is required"):
        plain.net(x, 9, global_cond=cond, stop_timestep=-1)
    with pytest.raises(ConfigError, match="needs policy.net=unet"):
        tiny_config(*CTM, "policy.net=transformer")


@pytest.mark.parametrize("span", ["one", "uniform", "full"])
def test_ctm_draws_stop_points_below_t_and_solves_no_further(span):
    teacher, student, *_ = v_teacher_student_batch()
    loss = ConsistencyDistillation(
        student, teacher, student, DistillConfig(objective="ctm", solver_span=span)
    )
    draws = loss.sample_training_noise(4096, torch.Generator().manual_seed(0), torch.device("cpu"))
    index, stop, steps = draws["grid_index"], draws["stop_index"], draws["solver_steps"]
    assert (stop >= 0).all() and (stop <= index).all()
    assert (steps >= 1).all() and (steps <= index + 1 - stop).all()
    top = index == loss.grid_size - 1
    assert set(stop[top].tolist()) == set(range(loss.grid_size))  # every lower grid point and the clean end
    assert (stop == 0).float().mean() > 0.2  # the clean end, where 1-step sampling stops
    if span == "full":
        assert torch.equal(steps, index + 1 - stop)


def test_ctm_loss_is_zero_where_the_start_already_agrees_with_the_teacher():
    """From a v teacher (unclipped), the student's one-grid-step jump t -> s is the teacher's DDIM step, so
    the CTM loss is 0 where s is one grid step below t, and not where the teacher's two steps meet the
    student's one jump; the denoising term is the teacher's own x0 error."""
    clip = "policy.scheduler.clip_sample=false"
    teacher, _ = build("policy.scheduler.prediction_type=v_prediction", clip)
    student, _ = build(*CTM, clip, "policy.consistency.original_inference_steps=10")
    student.load_state_dict(teacher.state_dict(), strict=False)
    target = copy.deepcopy(student)
    batch = {"obs": obs_batch(), "action": torch.rand(3, 16, 2, generator=torch.Generator().manual_seed(6))}
    noise = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(7))
    loss = ConsistencyDistillation(student, teacher, target, DistillConfig(objective="ctm", loss="mse"))
    index, one = torch.tensor([9, 5, 0]), torch.ones(3, dtype=torch.long)
    loss(batch, noise, index, one, stop_index=index)  # s one grid step below t; the last: t = 9 -> clean
    assert loss.terms["train/consistency_loss"] < 1e-10
    loss(batch, noise, index, one, stop_index=torch.tensor([0, 3, 0]))
    assert loss.terms["train/consistency_loss"] > 1e-6
    with pytest.raises(ValueError, match="stop index exceeds its grid index"):
        loss(batch, noise, index, one, stop_index=torch.tensor([9, 6, 0]))


@pytest.fixture(scope="module")
def ctm_run(tmp_path_factory, teacher) -> Path:
    run = tmp_path_factory.mktemp("ctm") / "run"
    ctm = ["distill.objective=ctm", "train.val_every=20"]
    assert main(["distill", "--teacher", str(teacher), "--run-dir", str(run), *DISTILL, *ctm]) == 0
    return run


def test_ctm_distillation_lowers_its_loss_and_samples(ctm_run, tmp_path):
    rows = [json.loads(line) for line in (ctm_run / "metrics.jsonl").read_text().splitlines()]
    consistency = [r["train/consistency_loss"] for r in rows if "train/loss" in r]
    assert len(consistency) == 40
    assert len([r for r in rows if "val/loss" in r]) == 2  # the DDPM loss of the clean-end jump
    # The target network chases the student, so the CTM loss first rises (as in the CM run's first
    # steps on Push-T) and falls later than the CM loss: 0.81 at 40 steps here, 0.73 at 80. A student that
    # does not learn stays at or above 1.
    assert sum(consistency[-8:]) < 0.9 * sum(consistency[:8]), consistency
    path = ctm_run / "checkpoints" / "latest"
    student, cfg = load_policy(path)
    assert isinstance(student, ConsistencyPolicy) and student.is_ctm and cfg.distill.objective == "ctm"
    assert any(k.startswith("net.stop_step_encoder.") for k in student.state_dict())
    calls = []
    student.net.register_forward_hook(lambda *a: calls.append(1))
    lo = student.normalizer.params["action"].input_min
    hi = student.normalizer.params["action"].input_max
    for steps in (1, 3):
        calls.clear()
        student.set_sampler("consistency", steps)
        a = student.predict_action(obs_batch(), generator=torch.Generator().manual_seed(5))["action_pred"]
        assert len(calls) == steps and a.shape == (3, 16, 2) and torch.isfinite(a).all()
        assert (a >= lo - 1e-4).all() and (a <= hi + 1e-4).all()
    out = tmp_path / "eval3"
    assert main(["eval", "--checkpoint", str(path), "--out", str(out), "eval.num_inference_steps=3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sampler"] == "CTM jumps" and report["num_inference_steps"] == 3


def test_ctm_is_chosen_by_the_objective_only(teacher):
    with pytest.raises(ConfigError, match="set by 'distill.objective'"):
        distill_config(teacher, ["policy.consistency.ctm=true"])
    assert distill_config(teacher, ["distill.objective=ctm"]).policy.consistency.ctm
    assert not distill_config(teacher, []).policy.consistency.ctm
    with pytest.raises(ConfigError, match="use top_target=ode"):
        distill_config(teacher, ["distill.objective=ctm", "distill.top_target=ddim"])


# ----- distribution matching (distill.objective=dmd) ---------------------------------------------------
DMD = [
    "distill.objective=dmd",
    "distill.lr=1e-4",
    "train.log_every=1",
    "train.val_every=0",
    "eval.n_episodes=0",
]


@pytest.fixture(scope="module")
def v_pair(tmp_path_factory, traj_store) -> tuple[Path, Path]:
    """A tiny v-prediction teacher and a cm student distilled from it (the start DMD fine-tunes)."""
    root = tmp_path_factory.mktemp("v_pair")
    cfg = tiny_config(
        f"data.path={traj_store}", "train.num_steps=60", "policy.scheduler.prediction_type=v_prediction"
    )
    cfg.eval.n_episodes = 0
    Trainer(cfg, root / "teacher").fit()
    teacher = root / "teacher" / "checkpoints" / "latest"
    DistillTrainer(
        distill_config(teacher, [*DISTILL, "distill.num_steps=20", "eval.n_episodes=0"]), root / "cm"
    ).fit()
    return teacher, root / "cm" / "checkpoints" / "latest"


def dmd_loss_module(v_pair) -> tuple[DistributionMatching, dict]:
    teacher_path, cm = v_pair
    teacher, _ = load_teacher(teacher_path)
    student, _ = load_policy(cm)
    cfg = distill_config(teacher_path, ["distill.objective=dmd"])
    batch = {
        "obs": {"pos": torch.randn(4, 2, 2), "vel": torch.randn(4, 2, 2)},
        "action": torch.rand(4, student.cfg.horizon, 2),
        "action_is_pad": torch.zeros(4, student.cfg.horizon, dtype=torch.bool),
    }
    batch["action_is_pad"][0, -3:] = True
    return DistributionMatching(student, teacher, cfg.distill, distributed=False), batch


def test_dmd_moves_chunks_from_the_fake_towards_the_teacher(v_pair, monkeypatch):
    """The loss's gradient on the student's chunk is (x0_fake - x0_teacher) / mean|x - x0_teacher| per
    sample (so descent moves it from where the fake network puts it towards the teacher), zero on padded
    actions, and zero everywhere while the fake network is still the teacher."""
    dmd, batch = dmd_loss_module(v_pair)
    monkeypatch.setattr(dmd.fake, "step", lambda chunk, batch: torch.zeros(()))  # the fake stays the teacher
    torch.manual_seed(0)
    assert dmd(batch).item() == 0.0
    x = torch.randn(4, dmd.student.cfg.horizon, 2, requires_grad=True)
    monkeypatch.setattr(dmd, "generate", lambda cond, z: x if torch.is_grad_enabled() else x.detach())
    real_estimate = dmd.fake.clean_estimate
    monkeypatch.setattr(dmd.fake, "clean_estimate", lambda x_t, t, obs: real_estimate(x_t, t, obs) + 0.1)
    loss = dmd(batch)
    loss.backward()
    assert loss.item() > 0
    pad = batch["action_is_pad"][..., None].expand_as(x)
    assert torch.all(x.grad[pad] == 0)
    assert torch.all(x.grad[~pad] > 0)  # descent lowers x: the fake's estimates sit 0.1 above the teacher's
    # per sample, 0.1 / its normalization, spread over all entries (masked_mse's mean)
    for row in (1, 2, 3):
        assert torch.allclose(x.grad[row], x.grad[row, 0, 0].expand_as(x.grad[row]), rtol=1e-5)


def test_dmd_regression_pulls_the_chunk_to_the_teachers_ode_solve(v_pair, monkeypatch):
    """With distill.dmd_regression_weight = w and the distribution term at zero (the fake is the teacher),
    the loss is w * masked_mse(x, ODE(z)): the student's chunk x from noise z against the teacher's DDIM
    chain from the same z, one grid step per call from the top of the grid to the clean end."""
    dmd, batch = dmd_loss_module(v_pair)
    dmd.cfg = dataclasses.replace(dmd.cfg, dmd_regression_weight=3.0)
    monkeypatch.setattr(dmd.fake, "step", lambda chunk, batch: torch.zeros(()))
    noises = []
    generate = dmd.generate
    monkeypatch.setattr(dmd, "generate", lambda cond, z: noises.append(z) or generate(cond, z))
    torch.manual_seed(0)
    loss = dmd(batch)
    z = noises[-1]  # the noise of the chunk with gradients (the fake's chunks come first)
    student, teacher = dmd.student, dmd.teacher
    with torch.no_grad():
        x = generate(student.global_cond(student.encode_obs(batch["obs"])), z)
        cond = teacher.global_cond(teacher.encode_obs(batch["obs"]))
        ode, skip = z.clone(), (dmd.top + 1) // dmd.grid_size
        for t in range(dmd.top, -1, -skip):  # an independent chain of the teacher's DDIM steps
            now = torch.full((4,), t)
            ode = ddim_step(teacher, ode, now, now - skip, cond)
    mask = student.loss_mask(batch, student.normalizer.normalize("action", batch["action"]), None)
    regression = student.masked_mse(x, ode, mask)
    assert regression > 0
    assert torch.allclose(dmd.terms["train/regression_mse"], regression, rtol=1e-5)
    assert torch.allclose(loss, 3.0 * regression, rtol=1e-5)  # the distribution term is exactly zero here
    # without the weight the term is neither computed nor logged
    dmd.cfg = dataclasses.replace(dmd.cfg, dmd_regression_weight=0.0)
    assert dmd(batch).item() == 0.0 and "train/regression_mse" not in dmd.terms


def test_sid_loss_is_the_fisher_form_with_gradients_through_both_score_networks(v_pair, monkeypatch):
    """distill.dmd_divergence=fisher: the loss is mean(mask * d * ((x0_teacher - x) - alpha d) / scale),
    d = x0_teacher - x0_fake at x_t; zero with a zero gradient while the fake is the teacher; its gradient
    reaches the chunk through the teacher's clean estimate (so it is not DMD's), and never the fake's
    weights, which stay trainable."""
    dmd, batch = dmd_loss_module(v_pair)
    dmd.cfg = dataclasses.replace(dmd.cfg, dmd_divergence="fisher", sid_alpha=1.2)
    obs, teacher = batch["obs"], dmd.teacher
    mask = dmd.student.loss_mask(batch, dmd.student.normalizer.normalize("action", batch["action"]), None)
    torch.manual_seed(0)
    x = torch.randn(4, dmd.student.cfg.horizon, 2, requires_grad=True)
    t = torch.tensor([2, 30, 60, 97])
    x_t = teacher.noise_scheduler.add_noise(x, torch.randn_like(x), t)
    loss, _ = dmd.fisher_loss(x, x_t, t, obs, mask)  # the fake network is still the teacher
    loss.backward()
    assert loss.item() == 0.0 and torch.allclose(x.grad, torch.zeros_like(x), atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in dmd.fake.net.parameters())

    real_estimate = dmd.fake.clean_estimate
    monkeypatch.setattr(dmd.fake, "clean_estimate", lambda x_t, t, obs: real_estimate(x_t, t, obs) + 0.1)
    x.grad = None
    x_t = teacher.noise_scheduler.add_noise(x, torch.randn_like(x), t)
    loss, gap = dmd.fisher_loss(x, x_t, t, obs, mask)
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    # an independent statement of the same loss, d = -0.1 everywhere
    real = clean_estimate(teacher, x_t, t, obs)
    m = mask.float()
    scale = ((x - real).detach().abs() * m).sum((1, 2)) / m.sum((1, 2))
    expected = (-0.1 * ((real - x) + 1.2 * 0.1) / scale.view(-1, 1, 1) * m).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(gap, ((0.1 / scale).view(-1, 1, 1) * m).sum() / m.sum(), rtol=1e-5)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-8)
    # DMD's gradient for the same gap: (x0_fake - x0_teacher) / scale, no Jacobian of the teacher
    dmd_grad = (0.1 / scale).view(-1, 1, 1) * m / m.numel()
    assert not torch.allclose(grad, dmd_grad, rtol=1e-2)
    assert all(p.grad is None and p.requires_grad for p in dmd.fake.net.parameters())


def assert_dmd_terms_finite(run: Path, steps: int) -> None:
    """A DMD run logged its loss, fake loss and gap at every one of its steps, all finite."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    terms = [r for r in rows if "train/dmd_grad" in r]
    assert len(terms) == steps and all(
        torch.isfinite(torch.tensor([r["train/loss"], r["train/fake_loss"], r["train/dmd_grad"]])).all()
        for r in terms
    )


def assert_moved_from(start: Path, student: ConsistencyPolicy) -> None:
    """Some network weight of `student` differs from the checkpoint it was fine-tuned from."""
    start_state, state = load_policy(start)[0].state_dict(), student.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in start_state.items() if k.startswith("net."))


def test_dmd_fine_tunes_resumes_and_exports_a_student(v_pair, tmp_path):
    teacher, cm = v_pair
    cfg = distill_config(
        teacher,
        [*DISTILL, *DMD, f"distill.init_student={cm}", "distill.num_steps=16", "train.checkpoint_every=8"],
    )
    DistillTrainer(cfg, tmp_path / "straight").fit()
    with pytest.raises(Interrupted):
        KilledDistillation(cfg, tmp_path / "resumed").fit()  # stops after its step-8 checkpoint
    DistillTrainer(cfg, tmp_path / "resumed").fit()
    a = load_training_state(tmp_path / "straight" / "checkpoints" / "latest")
    b = load_training_state(tmp_path / "resumed" / "checkpoints" / "latest")
    assert "target" not in a and set(a["fake"]) == {"model", "optimizer"}
    for part, state_a, state_b in (
        ("student", a["model"], b["model"]),
        ("fake", a["fake"]["model"], b["fake"]["model"]),
    ):
        for key in state_a:
            assert torch.allclose(state_a[key], state_b[key], atol=1e-6), (part, key)
    # the fake network learned the student's chunks: it is no longer the teacher
    t_state = load_policy(teacher)[0].state_dict()
    assert any(not torch.equal(t_state[k], a["fake"]["model"][k]) for k in t_state if k.startswith("net."))
    assert_dmd_terms_finite(tmp_path / "straight", 16)
    student, student_cfg = load_policy(tmp_path / "straight" / "checkpoints" / "latest")
    assert isinstance(student, ConsistencyPolicy) and student_cfg.distill.objective == "dmd"
    assert_moved_from(cm, student)
    obs = {"pos": torch.randn(64, 2, 2) * 3, "vel": torch.randn(64, 2, 2) * 3}
    for steps in (1, 2):
        student.set_sampler("consistency", steps)
        action = student.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
        low = student.normalizer.params["action"].input_min
        high = student.normalizer.params["action"].input_max
        assert torch.isfinite(action).all() and (action >= low - 1e-4).all() and (action <= high + 1e-4).all()


def test_sid_fine_tunes_a_student(v_pair, tmp_path):
    """A short distill.dmd_divergence=fisher run: finite losses and terms, a student that moved."""
    teacher, cm = v_pair
    overrides = [*DISTILL, *DMD, f"distill.init_student={cm}", "distill.num_steps=6"]
    cfg = distill_config(teacher, [*overrides, "distill.dmd_divergence=fisher"])
    DistillTrainer(cfg, tmp_path / "sid").fit()
    assert_dmd_terms_finite(tmp_path / "sid", 6)
    student, student_cfg = load_policy(tmp_path / "sid" / "checkpoints" / "latest")
    assert student_cfg.distill.dmd_divergence == "fisher"
    assert_moved_from(cm, student)


def test_dmd_needs_a_v_teacher_and_valid_settings(teacher, v_pair, tmp_path):
    cfg = distill_config(teacher, [*DISTILL, *DMD, "distill.num_steps=1"])
    with pytest.raises(TeacherError, match="prediction_type=v_prediction"):
        DistillTrainer(cfg, tmp_path / "eps").fit()
    for bad, match in (
        ("distill.dmd_t_max=100", "dmd_t_max=100 must satisfy"),
        ("distill.dmd_t_min=-1", "dmd_t_min=-1"),
        ("distill.dmd_fake_updates=0", "dmd_fake_updates=0 must be >= 1"),
        ("distill.dmd_fake_lr=0", "dmd_fake_lr=0"),
        ("distill.dmd_regression_weight=-1", "dmd_regression_weight=-1.0 must be >= 0"),
        ("distill.sid_alpha=-1", "sid_alpha=-1.0 must be >= 0"),
        ("distill.dmd_divergence=js", "dmd_divergence='js' is not one of"),
    ):
        with pytest.raises(ConfigError, match=match):
            distill_config(v_pair[0], ["distill.objective=dmd", bad])
    with pytest.raises(ConfigError, match="a term of distill.objective=dmd, not of 'cm'"):
        distill_config(v_pair[0], ["distill.dmd_regression_weight=1"])
    with pytest.raises(ConfigError, match="the loss of distill.objective=dmd, not of 'ctm'"):
        distill_config(v_pair[0], ["distill.objective=ctm", "distill.dmd_divergence=fisher"])
    # a cm run's folder does not resume as dmd
    cm_cfg = distill_config(v_pair[0], [*DISTILL, "distill.num_steps=2", "eval.n_episodes=0"])
    DistillTrainer(cm_cfg, tmp_path / "cm").fit()
    with pytest.raises(ResumeMismatch, match="different configuration"):
        DistillTrainer(
            distill_config(v_pair[0], [*DISTILL, *DMD, "distill.num_steps=2"]), tmp_path / "cm"
        ).fit()


def test_a_refused_distillation_creates_nothing_and_resumes_name_distill_keys(tmp_path, teacher, capsys):
    """Issue 38 item 15: a distillation refused by its teacher leaves no run folder; a finished or
    shortened distillation is refused naming distill.num_steps (train.num_steps cannot be set in a
    distillation run), and raising distill.num_steps continues it, as train does with train.num_steps."""
    refused = tmp_path / "eps"
    args = ["distill", "--teacher", str(teacher), "--run-dir", str(refused), *DISTILL, *DMD]
    assert main(args) == 2
    assert "prediction_type=v_prediction" in capsys.readouterr().err
    assert not refused.exists()
    run = tmp_path / "cm"
    args = ["distill", "--teacher", str(teacher), "--run-dir", str(run), *DISTILL, "eval.n_episodes=0"]
    assert main([*args, "distill.num_steps=4"]) == 0
    capsys.readouterr()
    for steps, message in (
        (4, "holds a finished run (step 4 of distill.num_steps=4)"),
        (2, "distill.num_steps=2 is below"),
    ):
        assert main([*args, f"distill.num_steps={steps}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "train.num_steps" not in err, err
    assert main([*args, "distill.num_steps=6"]) == 0
    assert load_training_state(run / "checkpoints" / "latest")["step"] == 6


def test_every_network_of_a_distillation_step_sees_one_view_of_each_camera():
    """Deviation of issue 38: with a random crop (training), the student saw one crop and the teacher,
    the target network (centre crops) and DMD's fake network (its own random crop) others, so the
    consistency target was computed on another view. Now one crop is drawn per sample and every network
    of the step encodes exactly that view (its backbone's input is the same tensor)."""
    from conftest import tiny_image_policy

    from diffpolicy.models.rgb import RgbEncoder

    teacher = tiny_image_policy("policy.scheduler.prediction_type=v_prediction").requires_grad_(False)
    cfg = copy.deepcopy(teacher.cfg)
    cfg.type, cfg.scheduler.sampler = "consistency", "consistency"
    cfg.consistency.original_inference_steps = 20
    student = ConsistencyPolicy(cfg, teacher.shape_meta)
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.train()
    B, T = 6, teacher.n_obs_steps
    g = torch.Generator().manual_seed(0)
    batch = {
        "obs": {
            "image": torch.rand(B, T, 3, 32, 32, generator=g),
            "agent_pos": torch.rand(B, T, 2, generator=g),
        },
        "action": torch.rand(B, cfg.horizon, 2, generator=g) * 512,
        "action_is_pad": torch.zeros(B, cfg.horizon, dtype=torch.bool),
    }
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name, policy):
        (encoder,) = [m for m in policy.modules() if isinstance(m, RgbEncoder)]
        for backbone in encoder.backbones.values():
            backbone.register_forward_pre_hook(
                lambda m, args: seen.setdefault(name, []).append(args[0].detach())
            )

    target = copy.deepcopy(student).eval()
    cm = ConsistencyDistillation(student, teacher, target, DistillConfig(solver_span="one"))
    dmd = DistributionMatching(student, teacher, DistillConfig(objective="dmd"), distributed=False)
    for name, policy in (
        ("student", student),
        ("teacher", teacher),
        ("target", target),
        ("fake", dmd.fake.net),
    ):
        record(name, policy)
    torch.manual_seed(0)
    for loss in (cm, dmd):
        seen.clear()
        loss(batch)
        views = [(name, x) for name, xs in seen.items() for x in xs]
        assert {name for name, _ in views} >= {"student", "teacher"} | (
            {"target"} if loss is cm else {"fake"}
        )
        first = views[0][1]
        assert first.shape[-2:] == (28, 28)  # the crop, not the 32x32 frame
        for name, x in views:
            assert torch.equal(x, first), f"{type(loss).__name__}: the {name} sees another view"
        # one crop per sample: the samples' views are not all cut at one place
        frames = first.view(B, T, 3, 28, 28)[:, 0]
        offsets = {
            next(
                (dy, dx)
                for dy in range(5)
                for dx in range(5)
                if torch.allclose(
                    batch["obs"]["image"][b, 0, :, dy : dy + 28, dx : dx + 28] * 2 - 1, frames[b], atol=1e-5
                )
            )
            for b in range(B)
        }
        assert len(offsets) > 1
