"""Strict config loading, overrides and the shipped YAML files."""

import pytest

from mmgrpo.config import Config, ConfigError, apply_override, config_dir, load_config


@pytest.mark.parametrize("path", sorted(config_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.rewards, f"{path.name} lists no rewards"


def test_modality_name_resolves_to_shipped_yaml():
    assert load_config("toy").modality == "toy"


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_stepz' \(did you mean 'train\.max_steps'\?\)"):
        load_config("toy", ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"'rewards\.0\.wieght'.*'rewards\.0\.weight'"):
        load_config({"rewards": [{"name": "x", "wieght": 2}]})


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match="train.group_size must be an integer"):
        load_config("toy", ["train.group_size=four"])
    with pytest.raises(ConfigError, match=r"loss.aggregation = 'dapoo' is not one of .*did you mean 'dapo'"):
        load_config("toy", ["loss.aggregation=dapoo"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config("toy", ["train.dynamic_sampling=3"])


def test_unknown_modality_suggests():
    with pytest.raises(ConfigError, match="unknown modality 'tyo'.*did you mean 'toy'"):
        load_config("tyo")


def test_overrides_parse_yaml_values_and_list_indices():
    cfg = load_config("toy", ["optim.lr=1e-4", "advantage.clip=null", "rewards.0.weight=2", "train.seed=7"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.advantage.clip is None
    assert cfg.rewards[0].weight == 2.0
    assert cfg.train.seed == 7
    data = {"a": [{"b": 1}]}
    apply_override(data, "a.0.b=5")
    assert data == {"a": [{"b": 5}]}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override({}, "nothing")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override({"a": [1]}, "a.3=1")


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_builtin_name_resolves():
    from mmgrpo.registry import ADAPTERS, DATASETS, REWARDS, resolve

    for table, kind in ((ADAPTERS, "pipeline"), (REWARDS, "reward"), (DATASETS, "prompt set")):
        for name in table:
            assert callable(resolve(name, table, kind)), name


def test_user_file_and_module_resolution(tmp_path):
    from mmgrpo.registry import REWARDS, resolve

    f = tmp_path / "my_reward.py"
    f.write_text("def shout(samples, prompts, **_):\n    return [1.0 for _ in samples]\n")
    assert resolve(f"{f}:shout", REWARDS, "reward")(["a"], ["p"]) == [1.0]
    assert resolve("mmgrpo.rewards.sequence:exact_match", REWARDS, "reward").__name__ == "exact_match"
    with pytest.raises(ConfigError, match="unknown reward 'sequnce_match'.*did you mean 'sequence_match'"):
        resolve("sequnce_match", REWARDS, "reward")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        resolve(f"{f}:nope", REWARDS, "reward")


def test_asset_paths_expand_to_the_installed_assets_folder():
    from pathlib import Path

    import mmgrpo.assets
    from mmgrpo.registry import expand_assets

    root = Path(mmgrpo.assets.__file__).parent / "_probe"
    root.mkdir(exist_ok=True)
    try:
        out = expand_assets({"model": "asset:_probe", "nested": ["asset:_probe/x.json", "plain"], "n": 3})
        assert out == {"model": str(root), "nested": [str(root / "x.json"), "plain"], "n": 3}
    finally:
        root.rmdir()
    with pytest.raises(ConfigError, match="embedded asset 'nothing_here' is missing"):
        expand_assets("asset:nothing_here")


def test_missing_optional_package_names_the_extra(tmp_path):
    from mmgrpo.trainer import train

    adapter_file = tmp_path / "needs_pkg.py"
    adapter_file.write_text(
        "class NeedsPackage:\n    def __init__(self):\n        import package_that_is_not_installed  # noqa: F401\n"
    )
    with pytest.raises(ConfigError, match=r"needs the package 'package_that_is_not_installed'.*pip install 'mmgrpo\[dev\]'"):
        train({"pipeline": {"name": f"{adapter_file}:NeedsPackage"}}, out=tmp_path / "run", progress=False)


def test_flow_grpo_betas_come_with_their_kl_convention():
    for name in ("sd3", "flux", "wan"):  # betas from Flow-GRPO assume its KL scale
        assert load_config(config_dir() / f"{name}.yaml").loss.kl_convention == "flow_grpo", name
    assert load_config("toy").loss.kl_convention == "exact"
    with pytest.raises(ConfigError, match=r"loss\.kl_convention = 'flow-grpo' is not one of .*did you mean 'flow_grpo'"):
        load_config("toy", ["loss.kl_convention=flow-grpo"])


def test_validate_rejects_inconsistent_settings():
    from mmgrpo.config import validate

    validate(load_config("toy"))
    with pytest.raises(ConfigError, match="train.group_size must be at least 2"):
        validate(load_config("toy", ["train.group_size=1"]))
    with pytest.raises(ConfigError, match=r"set loss\.kl_closed_form=true or loss\.kl_convention=exact"):
        validate(load_config("toy", ["loss.beta=0.1", "loss.kl_convention=flow_grpo", "loss.kl_closed_form=false"]))


def test_dataclass_checks_become_config_errors():
    from dataclasses import dataclass

    from mmgrpo.config import from_dict

    @dataclass
    class Options:
        path: str
        rate: float = 1.0

        def __post_init__(self):
            if self.rate <= 0:
                raise ValueError(f"rate must be > 0, got {self.rate}")

    assert from_dict(Options, {"path": "x"}, "pipeline.kwargs").rate == 1.0
    with pytest.raises(ConfigError, match=r"^missing config key 'pipeline\.kwargs\.path'"):
        from_dict(Options, {"rate": 2.0}, "pipeline.kwargs")
    with pytest.raises(ConfigError, match=r"^pipeline\.kwargs: rate must be > 0, got -1"):
        from_dict(Options, {"path": "x", "rate": -1}, "pipeline.kwargs")
