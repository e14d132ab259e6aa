"""Recipes, dotted overrides and their errors (streamssl.config)."""

import pytest
from omegaconf import OmegaConf

from streamssl.config import ConfigError, load_config, recipe_dir
from streamssl.nn.encoder import FastConformerEncoder

RECIPES = sorted(p.stem for p in recipe_dir().glob("*.yaml") if not p.stem.startswith("finetune_"))
FINETUNE_RECIPES = sorted(p.stem for p in recipe_dir().glob("finetune_*.yaml"))


def test_every_recipe_loads_and_builds_its_encoder_arguments():
    assert {"demo", "small", "large", "small_lookahead", "small_left_context", "small_multilatency"} <= set(RECIPES)
    for name in RECIPES:
        cfg = load_config(name)
        for key in ("trainer.max_steps", "trainer.log_every", "trainer.ckpt_every", "trainer.seed",
                    "data.train_manifest", "data.noise_manifest", "data.val_manifest", "model.encoder.d_model"):
            assert OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) != "<absent>", (name, key)
        if "demo" in name:  # the demo recipes state what learns at their scale (bench/RESULTS.md)
            continue
        # NEST defaults in every full-size recipe.
        assert cfg.model.masking.mask_prob == 0.01 and cfg.model.masking.block_size == 40
        assert cfg.model.quantizer.num_codes == 8192 and cfg.model.quantizer.code_dim == 16
        assert cfg.model.quantizer.num_codebooks == 1


def test_finetune_recipes_take_their_architecture_from_a_pretraining_recipe():
    from streamssl.config import load_finetune_config

    assert {"finetune_demo", "finetune_small", "finetune_large"} <= set(FINETUNE_RECIPES)
    for name in FINETUNE_RECIPES:
        cfg = load_finetune_config(name)
        pre = load_config(cfg.model.pretrain_recipe)
        assert cfg.model.encoder == pre.model.encoder and cfg.model.features == pre.model.features, name
    assert load_finetune_config("finetune_demo", ["model.encoder.d_model=48"]).model.encoder.d_model == 48
    with pytest.raises(ConfigError, match="optim.freeze_encoder_steps"):
        load_finetune_config("finetune_demo", ["optim.freeze_encoder_steps=-1"])


def test_recipe_sizes_are_the_presets():
    """Encoder sizes live in nn/presets.py; a recipe that restates them must not drift."""
    from streamssl.nn.presets import PRESETS

    keys = ("d_model", "n_layers", "n_heads", "subsampling_channels", "conv_kernel_size", "ff_expansion")
    for recipe, preset in (("small", "small"), ("large", "large"), ("ssl_demo", "demo")):
        enc = load_config(recipe).model.encoder
        assert {k: enc[k] for k in keys} == {k: PRESETS[preset][k] for k in keys}, recipe


def test_presets_sizes():
    small, large, demo = (load_config(n).model.encoder for n in ("small", "large", "demo"))
    assert (small.d_model, small.n_layers, small.n_heads) == (176, 16, 4)
    assert (large.d_model, large.n_layers, large.n_heads) == (512, 17, 8)
    assert demo.d_model < small.d_model and demo.n_layers < small.n_layers
    assert small.conv_kernel_size == large.conv_kernel_size == 9


def test_left_context_recipes_match_masking_window_to_attention():
    for name in ("small_left_context", "large_left_context"):
        cfg = load_config(name)
        left, right = cfg.model.encoder.att_context_size
        assert left > 0 and right == 0
        assert cfg.model.masking.left_context == left * cfg.model.encoder.subsampling_factor


def test_latency_variants_are_valid_encoder_contexts():
    for name in ("small", "small_lookahead", "small_left_context", "small_multilatency"):
        enc_cfg = OmegaConf.to_container(load_config(name).model.encoder)
        enc_cfg.update(d_model=16, n_layers=1, n_heads=2, subsampling_channels=4)  # cheap to build
        FastConformerEncoder(**enc_cfg)
    multi = load_config("small_multilatency").model.encoder.att_context_size
    assert len(multi) == 3


def test_overrides_apply_with_types():
    cfg = load_config("demo", ["trainer.max_steps=7", "model.encoder.att_context_size=[16,0]", "optim.lr=0.5"])
    assert cfg.trainer.max_steps == 7 and list(cfg.model.encoder.att_context_size) == [16, 0]
    assert cfg.optim.lr == 0.5


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_stepz'.*trainer.max_steps"):
        load_config("demo", ["trainer.max_stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config("demo", ["trainer.max_steps=many"])


def test_malformed_override_and_bad_values():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config("demo", ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="trainer.max_steps: must be >= 1"):
        load_config("demo", ["trainer.max_steps=0"])
    with pytest.raises(ConfigError, match="model.features.normalize"):
        load_config("demo", ["model.features.normalize=per_utterance"])
    with pytest.raises(ConfigError, match="model.encoder.att_context_size"):
        load_config("demo", ["model.encoder.att_context_size=[1,2,3]"])


def test_unknown_recipe_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no_such_recipe")


def test_recipe_file_with_unknown_key_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: demo\nmodel:\n  encoder:\n    d_modle: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.encoder.d_modle.*d_model"):
        load_config(str(bad))


def test_recipe_base_chain_from_a_user_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: small_lookahead\ntrainer:\n  max_steps: 5\n")
    cfg = load_config(str(mine))
    assert list(cfg.model.encoder.att_context_size) == [-1, 3] and cfg.trainer.max_steps == 5
    assert cfg.model.encoder.d_model == 176
