import pytest

from diffpolicy.config import ConfigError, available_presets, from_dict, load_config, to_dict


def test_presets_load_and_roundtrip():
    names = available_presets()
    assert "trajectory2d_lowdim_unet" in names and "trajectory2d_lowdim_transformer" in names
    for name in names:
        cfg = load_config(name)
        assert from_dict(to_dict(cfg)) == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config("trajectory2d_lowdim_unet", ["train.batch_size=64", "policy.unet.down_dims=[8,16]"])
    assert cfg.train.batch_size == 64 and cfg.policy.unet.down_dims == [8, 16]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.bach_size=3", "unknown config key 'train.bach_size'"),
        ("nope=1", "unknown config key 'nope'"),
        ("train.batch_size=big", "bad value for 'train.batch_size'"),
        ("policy.net=lstm", "policy.net='lstm' is not one of"),
        ("policy.horizon=4", "policy.horizon=4 is too short"),
        ("train.batch_size", "must look like key.path=value"),
        ("eval.n_episodes=-1", "eval.n_episodes=-1 must be >= 0"),
        ("eval.n_envs=0", "eval.n_envs=0 >= 1"),
        ("eval.noise_scale=-0.5", "eval.noise_scale=-0.5 must be >= 0"),
        ("eval.noise_scale=nan", "eval.noise_scale=nan must be >= 0"),
        ("train.eval_every=10 train.eval_seed=100040", "overlap the final evaluation's"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_config("trajectory2d_lowdim_unet", override.split(" "))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset 'nope' not found"):
        load_config("nope")


def test_preset_with_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lr_rate'"):
        load_config(path)


def test_with_overrides_copies_and_checks():
    from diffpolicy.config import with_overrides

    cfg = load_config("trajectory2d_lowdim_unet")
    other = with_overrides(cfg, ["eval.n_episodes=7"])
    assert other.eval.n_episodes == 7 and cfg.eval.n_episodes == 50
    with pytest.raises(ConfigError, match="unknown config key 'eval.n_episode'"):
        with_overrides(cfg, ["eval.n_episode=7"])


@pytest.mark.parametrize(
    "preset", ["trajectory2d_lowdim_unet", "pusht_state_unet_cpu", "pointmaze_state_unet_cpu"]
)
def test_the_sampler_follows_the_objective_set_after_it(preset):
    """policy.objective=flow on a DDPM preset: the preset's DDPM sampler and its step count give way to the
    flow default (issue 38 item 6), as policy.objective=ddpm does on the flow preset."""
    flow = load_config(preset, ["policy.objective=flow"])
    assert (flow.policy.scheduler.sampler, flow.policy.scheduler.num_inference_steps) == ("euler", 4)
    back = load_config("pusht_state_flow_cpu", ["policy.objective=ddpm"])
    assert (back.policy.scheduler.sampler, back.policy.scheduler.num_inference_steps) == ("ddpm", 100)
    # a step count or sampler the command line names is kept (heun fits a flow policy)
    steps = load_config(preset, ["policy.objective=flow", "policy.scheduler.num_inference_steps=10"])
    assert (steps.policy.scheduler.sampler, steps.policy.scheduler.num_inference_steps) == ("euler", 10)
    heun = load_config(preset, ["policy.scheduler.sampler=heun", "policy.objective=flow"])
    assert heun.policy.scheduler.sampler == "heun"
    # the Python API follows the same rule
    from diffpolicy.config import with_overrides

    assert with_overrides(load_config(preset), ["policy.objective=flow"]).policy.scheduler.sampler == "euler"


def test_a_sampler_named_with_the_objective_that_does_not_fit_it_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match="policy.scheduler.sampler='ddim' does not fit policy.objective='flow'"
    ):
        load_config("trajectory2d_lowdim_unet", ["policy.objective=flow", "policy.scheduler.sampler=ddim"])
    with pytest.raises(
        ConfigError, match="policy.scheduler.sampler='ddpm' does not fit policy.objective='flow'"
    ):
        load_config("pusht_state_flow_cpu", ["policy.scheduler.sampler=ddpm"])
    preset = tmp_path / "mine.yaml"  # objective and sampler named together in one preset: a contradiction
    preset.write_text("policy:\n  objective: flow\n  scheduler:\n    sampler: ddim\n")
    with pytest.raises(ConfigError, match="does not fit policy.objective='flow'"):
        load_config(preset)
    # a preset naming only the objective gets the objective's sampler
    preset.write_text("policy:\n  objective: flow\n")
    assert load_config(preset).policy.scheduler.sampler == "euler"
