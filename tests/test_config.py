"""Config: typed keys, TOML files, overrides, locked-defaults layering, validation."""

from __future__ import annotations

import pytest

from lmtune import config as c


def test_builtin_defaults_without_locked_file():
    cfg = c.load(locked=False)
    assert cfg.train.ac_budget == 1.0 and cfg.train.micro_batch_size == 32 and cfg.model.n_layer == 12


def test_shipped_locked_defaults_carry_the_seed_values(in_tmp):
    cfg = c.load()
    assert (cfg.model.norm_placement, cfg.model.attention) == ("pre", "sdpa")
    assert (cfg.train.dtype, cfg.train.compile, cfg.train.compile_mode) == ("bfloat16", True, "default")
    assert (cfg.train.optimizer, cfg.train.warmup_steps, cfg.train.weight_decay) == ("adamw", 0, 0.0)
    assert (cfg.train.accumulation_steps, cfg.train.ac_budget, cfg.train.micro_batch_size) == (1, 0.75, 32)
    prov = c.provenance(c.SHIPPED_LOCKED)
    assert prov["model.norm_placement"]["source"] == "pre-vs-post-layer-norm-2 group"
    assert set(prov) == {k for k in c.flatten_toml(c.read_toml(c.SHIPPED_LOCKED), "x")}


def test_layering_project_locked_then_explicit_then_files_then_cli(in_tmp):
    (in_tmp / "lmtune.locked.toml").write_text('[train]\nmicro_batch_size = 16\nlr = 1e-3\n')
    (in_tmp / "mine.toml").write_text('[train]\nlr = 2e-3\nsteps = 7\n')
    (in_tmp / "explicit.toml").write_text('[train]\nmicro_batch_size = 8\n')
    cfg = c.load(["mine.toml"], ["train.steps=9"])
    assert (cfg.train.micro_batch_size, cfg.train.lr, cfg.train.steps) == (16, 2e-3, 9)
    assert cfg.train.ac_budget == 0.75  # still from the shipped file
    cfg = c.load([], [], locked="explicit.toml")
    assert cfg.train.micro_batch_size == 8 and cfg.train.lr == 1e-3


def test_overrides_are_typed():
    cfg = c.load(overrides=["train.compile=false", "data.files=a.txt,b.txt", "data.dataset=files",
                            "model.dropout=0.1", "train.steps=5"], locked=False)
    assert cfg.train.compile is False and cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.model.dropout == 0.1 and cfg.train.steps == 5


@pytest.mark.parametrize("override, fragment", [
    ("model.n_layr=3", "Did you mean model.n_layer"),
    ("modle.n_layer=3", "sections model, data, train, system"),
    ("train.steps=2.5", "expected an integer"),
    ("model.dropout=1.5", "<= 1.0"),
    ("data.fraction=0", "> 0.0"),
    ("model.norm_placement=sandwich", "one of 'pre', 'post'"),
])
def test_bad_overrides(override, fragment):
    with pytest.raises(c.ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        c.load(overrides=[override], locked=False)


def test_bad_toml(in_tmp):
    (in_tmp / "bad.toml").write_text("[train\nlr=1")
    with pytest.raises(c.ConfigError, match="not valid TOML"):
        c.load(["bad.toml"])
    (in_tmp / "wrong.toml").write_text('[optim]\nlr = 1\n')
    with pytest.raises(c.ConfigError, match=r"unknown section \[optim\]"):
        c.load(["wrong.toml"])
    (in_tmp / "typed.toml").write_text('[train]\nsteps = "many"\n')
    with pytest.raises(c.ConfigError, match="typed.toml: train.steps=many is not accepted"):
        c.load(["typed.toml"])


def test_flat_round_trip_and_describe():
    cfg = c.load(overrides=["train.lr=1e-3"], locked=False)
    assert c.from_flat(cfg.flat()) == cfg
    text = c.describe()
    for key in c.all_keys():
        assert key in text
    assert "Activation-memory budget" in text  # the docstring under the field is shown


def test_lmtune_locked_names_a_locked_file_like_locked(in_tmp, monkeypatch):
    (in_tmp / "env.toml").write_text('[train]\nmicro_batch_size = 12\n')
    monkeypatch.setenv(c.LOCKED_ENV, str(in_tmp / "env.toml"))
    cfg, sources = c.resolve()
    assert cfg.train.micro_batch_size == 12 and sources["train.micro_batch_size"] == "locked env.toml"
    monkeypatch.setenv(c.LOCKED_ENV, str(in_tmp / "missing.toml"))
    with pytest.raises(c.ConfigError, match="locked-defaults file not found"):
        c.load()


def test_a_locked_budget_applies_only_in_the_ac_mode_it_was_measured_in(in_tmp):
    """The shipped 0.75 is the compile partitioner's budget: eager runs keep 1.0 (no block checkpointed);
    a project file's blocks-mode budget applies to eager runs and not to compiled ones."""
    assert c.load().train.ac_budget == 0.75 and c.load().train.ac_mode == "budget"
    eager, sources = c.resolve(overrides=["train.compile=false"])
    assert eager.train.ac_budget == 1.0 and "measured with ac_mode=budget" in sources["train.ac_budget"]
    (in_tmp / "lmtune.locked.toml").write_text('[train]\nac_budget = 0.5\n\n[provenance."train.ac_budget"]\n'
                                               'source = "smoke frontier"\nac_mode = "blocks"\n')
    assert c.load(overrides=["train.compile=false"]).train.ac_budget == 0.5
    assert c.load().train.ac_budget == 0.75  # compiled: the blocks value is skipped, the shipped budget applies
    assert c.load(overrides=["train.compile=false", "train.ac_budget=0.25"]).train.ac_budget == 0.25  # the CLI wins
