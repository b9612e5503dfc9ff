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
