"""The typed config: defaults, flat overrides, environment variables, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.config import FLAT_FIELDS, NestcastConfig


def test_defaults_describe_a_runnable_pipeline():
    config = NestcastConfig()
    assert config.data_dir == Path("data")
    assert config.model.kind == "nlstm" and config.model.depth >= 1
    assert config.windows.target_clip_min == 0 and config.windows.target_clip_max == 20
    assert config.export.fallback == "baseline"
    assert config.aggregate.shop_merge_map[0] == 57


def test_flat_overrides_reach_their_sections_and_leave_the_original_alone():
    base = NestcastConfig()
    changed = base.with_overrides(epochs=3, lookback=6, kind="gru", data_dir="/tmp/lake", max_item_price=5.0)
    assert (changed.train.epochs, changed.windows.lookback, changed.model.kind) == (3, 6, "gru")
    assert changed.data_dir == Path("/tmp/lake") and changed.ingest.max_item_price == 5.0
    assert base.train.epochs != 3 or base.windows.lookback != 6
    assert changed.flat()["epochs"] == 3


def test_none_overrides_are_ignored():
    assert NestcastConfig().with_overrides(epochs=None) == NestcastConfig()


def test_unknown_and_invalid_overrides_fail_with_the_field_name():
    with pytest.raises(ValueError, match="unknown configuration field 'epoch'"):
        NestcastConfig().with_overrides(epoch=3)
    with pytest.raises(ValidationError, match="epochs"):
        NestcastConfig().with_overrides(epochs=0)
    with pytest.raises(ValidationError, match="kind"):
        NestcastConfig().with_overrides(kind="transformer")
    with pytest.raises(ValidationError, match="target_clip_max"):
        NestcastConfig().with_overrides(target_clip_max=-1.0)


def test_environment_variables_override_defaults(monkeypatch):
    monkeypatch.setenv("NESTCAST_TRAIN__EPOCHS", "5")
    monkeypatch.setenv("NESTCAST_DATA_DIR", "/srv/lake")
    monkeypatch.setenv("NESTCAST_AGGREGATE__SHOP_MERGE_MAP", '{"3": 4}')
    config = NestcastConfig()
    assert config.train.epochs == 5
    assert config.data_dir == Path("/srv/lake")
    assert config.aggregate.shop_merge_map == {3: 4}


def test_every_flat_name_round_trips():
    config = NestcastConfig()
    assert set(config.flat()) == set(FLAT_FIELDS)
    assert NestcastConfig().with_overrides(**config.flat()) == config


# --- NESTCAST_* variables: unknown names, and bad values that name their variable ---------------------
def test_unknown_environment_variables_are_found_with_the_intended_name():
    from core.config import environment_warnings, known_environment_variables, unknown_environment_variables

    environ = {
        "NESTCAST_TRAIN__EPOCHS": "3",  # known
        "NESTCAST_AGGREGATE__SHOP_MERGE_MAP": "{}",  # known (a dict field)
        "NESTCAST_DATA_DIR": "/lake",  # known (top level)
        "NESTCAST_TRAIN": "{}",  # known (a whole section as JSON)
        "NESTCAST_TRAINN__EPOCHS": "5",  # section typo
        "NESTCAST_EPOCHS": "5",  # section left out
        "NESTCAST_WINDOW__LOOKBACK": "6",
        "NESTCAST_NOTHING_LIKE_IT": "1",
        "HOME": "/root",  # not ours
    }
    assert unknown_environment_variables(environ) == [
        ("NESTCAST_EPOCHS", "NESTCAST_TRAIN__EPOCHS"),
        ("NESTCAST_NOTHING_LIKE_IT", None),
        ("NESTCAST_TRAINN__EPOCHS", "NESTCAST_TRAIN__EPOCHS"),
        ("NESTCAST_WINDOW__LOOKBACK", "NESTCAST_WINDOWS__LOOKBACK"),
    ]
    assert environment_warnings({"NESTCAST_TRAINN__EPOCHS": "5"}) == [
        "unknown environment variable NESTCAST_TRAINN__EPOCHS is ignored; did you mean NESTCAST_TRAIN__EPOCHS?"
    ]
    # derived from the models: every flat field has its variable
    known = known_environment_variables()
    assert {f"NESTCAST_{'__'.join(path).upper()}" for path in FLAT_FIELDS.values()} <= known


def test_a_bad_environment_value_is_one_line_naming_the_variable(monkeypatch):
    from core.config import ConfigEnvironmentError, config_from_environment

    monkeypatch.setenv("NESTCAST_TRAIN__EPOCHS", "abc")
    with pytest.raises(ConfigEnvironmentError) as caught:
        config_from_environment()
    assert str(caught.value) == (
        "environment variable NESTCAST_TRAIN__EPOCHS='abc': Input should be a valid integer, "
        "unable to parse string as an integer"
    )
    monkeypatch.delenv("NESTCAST_TRAIN__EPOCHS")
    monkeypatch.setenv("NESTCAST_TRAIN__EPOCH", "5")
    with pytest.raises(ConfigEnvironmentError, match="NESTCAST_TRAIN__EPOCH='5'.*did you mean NESTCAST_TRAIN__EPOCHS"):
        config_from_environment()
    monkeypatch.delenv("NESTCAST_TRAIN__EPOCH")
    monkeypatch.setenv("NESTCAST_AGGREGATE__SHOP_MERGE_MAP", "not json")
    with pytest.raises(ConfigEnvironmentError, match="NESTCAST_AGGREGATE__SHOP_MERGE_MAP='not json': not valid JSON"):
        config_from_environment()
    monkeypatch.delenv("NESTCAST_AGGREGATE__SHOP_MERGE_MAP")
    monkeypatch.setenv("NESTCAST_MODEL__UNITS", "8")
    assert config_from_environment().model.units == 8


def test_the_dask_dashboard_stays_on_loopback_unless_asked():
    assert NestcastConfig().orchestration.dask_dashboard == "127.0.0.1:8787"
    assert NestcastConfig().with_overrides(dask_dashboard="0.0.0.0:8787").orchestration.dask_dashboard == "0.0.0.0:8787"


def test_the_clip_range_and_the_run_knobs_are_declared_once():
    from core.config import BACKTEST_KNOBS, DEFAULT_CLIP, RUN_KNOBS
    from core.evaluate import DEFAULT_CLIP as evaluate_clip
    from core.export import DEFAULT_CLIP as export_clip

    assert NestcastConfig().windows.clip == DEFAULT_CLIP == evaluate_clip == export_clip == (0.0, 20.0)
    assert NestcastConfig().with_overrides(target_clip_max=7.0).windows.clip == (0.0, 7.0)
    assert set(RUN_KNOBS) <= set(FLAT_FIELDS) and set(BACKTEST_KNOBS) <= set(RUN_KNOBS)
