import pytest
import yaml

from ssb.cli import main
from ssb.config import CONFIGS_DIR, ConfigError, SSBConfig, load_config, save_config, shipped


def test_shipped_configs_load():
    cfg = load_config("configs/paper_qwen2.5_3b.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert (cfg.rollout.k, cfg.rollout.temperature, cfg.rollout.top_k) == (4, 0.8, 50)
    assert (cfg.curate.target_pairs, cfg.curate.temperature, cfg.curate.max_new_tokens) == (256, 0.4, 8192)
    assert (cfg.train.lora_r, cfg.train.lora_alpha, cfg.train.lr, cfg.train.batch_size) == (32, 32, 2e-4, 4)
    assert (cfg.train.epochs, cfg.train.kd_temperature, cfg.train.kd_weight, cfg.train.ce_weight) == (3, 2.0, 1.0, 0.0)
    assert set(cfg.train.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert not cfg.train.qlora
    assert load_config("configs/qlora_24gb.yaml").train.qlora


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "capture.temperatures=[1, 2]", "eval.limit=null", "rounds=2"])
    assert cfg.train.lr == 1e-4 and cfg.capture.temperatures == (1.0, 2.0) and cfg.eval.limit is None
    assert cfg.rounds == 2


def test_the_pipeline_seed_moves_every_stage_seed_it_does_not_set():
    one = load_config(None, ["seed=3", "curate.seed=7"])
    assert (one.rollout.seed, one.curate.seed, one.train.seed, one.eval.seed) == (3, 7, 3, 0)
    shipped_default = load_config("configs/toy.yaml")
    assert (shipped_default.rollout.seed, shipped_default.train.seed) == (0, 0)
    with pytest.raises(ConfigError, match="^override seed=abc: seed: expected an integer"):
        load_config(None, ["seed=abc"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("nosuch=1", "unknown key nosuch"),
        ("train.epochs=abc", "train.epochs: expected an integer"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("train.qlora=3", "train.qlora: expected true/false"),
        ("model=3", "model: expected a mapping"),
        ("train.lr", "expected key=value"),
        ("train.variant=tails", "train.variant: expected one of tail|renorm, got 'tails'"),
        ("engine.backend=sglang", "engine.backend: expected one of vllm|hf"),
        ("model.dtype=fp8", "model.dtype: expected one of auto|float32|bfloat16|float16"),
        ("eval.protocol=gsm8k-8shot", "eval.protocol: expected one of ssb-paper|qwen-math|r1"),
        ("grading.mode=loose", "grading.mode: expected one of strict"),
        ("rollout.temperature=-0.1", "rollout.temperature: expected a temperature >= 0"),
        ("capture.temperatures=[1, 0]", r"capture.temperatures\[1\]: expected a temperature > 0"),
        ("rounds=0", "rounds: expected >= 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_kd_temperature_outside_the_store_is_an_error_or_an_explicit_opt_in():
    with pytest.raises(ConfigError, match=r"train.kd_temperature=3.0 is not one of capture.temperatures=\[1.0, 2.0\]"):
        load_config(None, ["train.kd_temperature=3"])
    with pytest.raises(ConfigError, match="train.approximate_c_t=true"):
        load_config(None, ["train.kd_temperature=3"])
    cfg = load_config(None, ["train.kd_temperature=3", "train.approximate_c_t=true"])
    assert cfg.train.kd_temperature == 3.0
    assert load_config(None, ["train.kd_temperature=3", "train.kd_weight=0", "train.ce_weight=1"])  # no KD, no c_T


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora_r: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("train:\n  typo_key: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key train.typo_key"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/paper_qwen2.5_3b.yaml", ["train.lr=3e-4"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg and isinstance(again, SSBConfig)
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 3e-4


def test_cli_reports_config_errors(capsys):
    assert main(["train", "train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_every_numeric_field_has_a_range_or_its_own_rule():
    """A new int or float field cannot slip in unchecked: it gets a range in RANGES or a rule of its own."""
    import dataclasses
    import typing

    from ssb.config import RANGES, SSBConfig

    # checked by rules of their own (temperatures, jsd_beta), or valid at any value (top_k <= 0: off)
    own_rule = {"rollout.temperature", "curate.temperature", "eval.temperature", "train.kd_temperature",
                "capture.temperatures", "train.jsd_beta", "rollout.top_k", "curate.top_k"}  # fmt: skip

    def numeric(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from numeric(tp, f"{prefix}{f.name}.")
            elif {int, float} & {tp, *typing.get_args(tp)}:
                yield prefix + f.name

    fields = set(numeric(SSBConfig))
    assert fields - own_rule == set(RANGES) - own_rule and not own_rule & set(RANGES)
    assert own_rule <= fields


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    """``--config toy`` (or ``toy.yaml``, or a checkout's ``configs/toy.yaml``) is ssb/configs/toy.yaml wherever ssb
    runs; the toy model and the dry run's architecture it names are the package's own files."""
    in_repo = load_config("configs/toy.yaml")
    assert in_repo.model.name_or_path == "ssb/assets/toy"  # in a checkout's root, as written (hashes unchanged)
    monkeypatch.chdir(tmp_path)
    for name in ("toy", "toy.yaml", "configs/toy.yaml", CONFIGS_DIR / "toy.yaml"):
        cfg = load_config(name)
        assert cfg.model.name_or_path == str(CONFIGS_DIR.parent / "assets" / "toy"), name
        assert cfg.train.dry_run_config == str(CONFIGS_DIR / "qwen2.5_3b_config.json")
        assert cfg.rollout == in_repo.rollout and cfg.train.lr == in_repo.train.lr
    assert shipped("ssb/nothing/here") is None and shipped("models/smollm2") is None
    (tmp_path / "ssb" / "assets" / "toy").mkdir(parents=True)  # a working directory's own path wins
    assert load_config("toy").model.name_or_path == "ssb/assets/toy"
    with pytest.raises(ConfigError, match=r"nope: no such config file.*configs/nope.yaml.*paper_qwen2.5_3b, .*toy"):
        load_config("nope")
    with pytest.raises(ConfigError, match="elsewhere/toy.yaml: no such config file"):
        load_config("elsewhere/toy.yaml")  # a path that is not there is not a name
