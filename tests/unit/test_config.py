"""The config: defaults that fit the machine, TOML round trips, and errors that say what to change."""

from pathlib import Path

import pytest

from tierserve.domain.config import (
    BatchingConfig,
    ConfigError,
    config_to_toml,
    default_config,
    load_config,
    parse_config,
)
from tierserve.domain.cores import format_cpu_list, parse_cpu_list


def test_default_config_splits_two_cores_between_fp32_and_bf16() -> None:
    config = default_config([0, 1])
    assert [(w.tier, w.cores) for w in config.workers] == [("fp32", [0]), ("bf16", [1])]
    assert len({w.port for w in config.workers} | {config.router.port}) == 3


def test_default_config_on_one_cpu_lets_workers_share_it() -> None:
    config = default_config([3])
    assert [w.cores for w in config.workers] == [[3], [3]]


def test_default_config_on_many_cores_gives_contiguous_halves() -> None:
    config = default_config(list(range(8)))
    assert [w.cores for w in config.workers] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_toml_round_trip(tmp_path: Path) -> None:
    config = default_config(list(range(6)))
    path = tmp_path / "pool.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path) == config


def test_chunked_prefill_turned_off_survives_the_toml_round_trip(tmp_path: Path) -> None:
    """Off is None in the config and 0 in TOML (which has no null): left out, it would read back
    as the 256-token default."""
    config = default_config([0, 1]).model_copy(update={"batching": BatchingConfig(prefill_chunk_tokens=0)})
    assert config.batching.prefill_chunk_tokens is None
    path = tmp_path / "pool.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path).batching.prefill_chunk_tokens is None


def test_cores_accept_kernel_cpu_list_notation() -> None:
    config = parse_config({"workers": [{"name": "w", "tier": "bf16", "cores": "0-3,8"}]})
    assert config.workers[0].cores == [0, 1, 2, 3, 8]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workers": []}, "workers"),
        ({"workers": [{"name": "w", "tier": "int9"}]}, "unknown tier 'int9'"),
        ({"workers": [{"name": "w", "tier": "fp32"}, {"name": "w", "tier": "bf16"}]}, "repeated: w"),
        ({"workers": [{"name": "a", "tier": "fp32", "port": 7000},
                      {"name": "b", "tier": "bf16", "port": 7000}]}, "same address"),
        ({"workers": [{"name": "w", "tier": "fp32", "cores": "3-1"}]}, "bad CPU range"),
        ({"workers": [{"name": "w", "tier": "fp32", "colour": "red"}]}, "colour"),
        ({"limits": {"max_new_tokens": 8, "default_max_new_tokens": 16},
          "workers": [{"name": "w", "tier": "fp32"}]}, "default_max_new_tokens"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_with_the_reason(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[router\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_worker_lookup_names_the_configured_workers() -> None:
    config = default_config([0, 1])
    assert config.worker("bf16-0").tier == "bf16"
    with pytest.raises(ConfigError, match="fp32-0, bf16-0"):
        config.worker("nope")


@pytest.mark.parametrize(
    ("text", "cpus", "canonical"),
    [("0", [0], "0"), ("0-3,8", [0, 1, 2, 3, 8], "0-3,8"), ("5,1,2", [1, 2, 5], "1-2,5"), ("", [], "")],
)
def test_cpu_list_parse_and_format(text: str, cpus: list[int], canonical: str) -> None:
    assert parse_cpu_list(text) == cpus
    assert format_cpu_list(cpus) == canonical


def test_cpu_list_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad CPU list item 'x'"):
        parse_cpu_list("0,x")


def test_tier_recipes_round_trip_and_default(tmp_path: Path) -> None:
    config = parse_config(
        {
            "tiers": {"int4-woq": {"group_size": 64, "lowp_mode": "INT8"}, "int8-sq": {"alpha": 0.7}},
            "data": {"eval_tokens": 512},
            "workers": [{"name": "w", "tier": "int4-woq"}],
        }
    )
    assert config.recipe("int4-woq").group_size == 64
    assert config.recipe("int8-sq").alpha == pytest.approx(0.7)
    assert config.recipe("bf16") == config.recipe("fp32")  # defaults when not configured
    path = tmp_path / "pool.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ({"int9": {}}, "unknown tiers int9"),
        ({"int8-sq": {"alpha": 1.5}}, "alpha"),
        ({"int4-woq": {"lowp_mode": "FP8"}}, "lowp_mode"),
        ({"int4-woq": {"kernel": "cuda"}}, "kernel"),
    ],
)
def test_bad_recipes_are_refused(tiers: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"tiers": tiers, "workers": [{"name": "w", "tier": "fp32"}]})


def test_batching_survives_the_toml_round_trip(tmp_path: Path) -> None:
    # The launcher hands workers the config as TOML: a pool started with batching off must stay off.
    config = parse_config(
        {
            "batching": {"enabled": False, "max_batch": 4, "kv_cache_tokens": 4096},
            "workers": [{"name": "w", "tier": "bf16"}],
        }
    )
    path = tmp_path / "pool.toml"
    path.write_text(config_to_toml(config))
    loaded = load_config(path)
    assert (loaded.batching.enabled, loaded.batching.max_batch, loaded.batching.kv_cache_tokens) == (
        False,
        4,
        4096,
    )
    assert loaded == config
