"""Run names tell runs apart: the month, the encoder and only the knobs that differ from the defaults."""

from __future__ import annotations

from core.config import NestcastConfig
from core.run_names import forecast_run_name, replay_run_name

DEFAULTS = NestcastConfig()


def test_a_run_with_the_defaults_is_named_by_its_month_and_encoder_only():
    assert forecast_run_name(DEFAULTS, DEFAULTS, "2014-05") == "forecast-2014-05-nlstm"


def test_the_knobs_that_differ_follow_in_the_run_knobs_order_whatever_order_they_were_given():
    config = DEFAULTS.with_overrides(units=16, epochs=1, kind="gru", learning_rate=0.001, data_dir="/elsewhere")
    expected = "forecast-2014-05-gru-epochs=1-learning_rate=0.001-units=16"
    assert forecast_run_name(config, DEFAULTS, "2014-05") == expected
    same = DEFAULTS.with_overrides(epochs=1, learning_rate=0.001, units=16, kind="gru")
    assert forecast_run_name(same, DEFAULTS, "2014-05") == expected
    assert forecast_run_name(DEFAULTS.with_overrides(epochs=DEFAULTS.train.epochs), DEFAULTS, "2014-05") == (
        "forecast-2014-05-nlstm"), "a knob given its default value is no difference"


def test_a_run_that_failed_before_its_month_was_known_says_so_and_what_it_ran_with():
    config = DEFAULTS.with_overrides(epochs=1)
    assert forecast_run_name(config, DEFAULTS) == "forecast-nlstm-epochs=1"
    assert forecast_run_name(config, DEFAULTS, failed=True) == "forecast-failed-nlstm-epochs=1"
    assert forecast_run_name(config, DEFAULTS, "2014-05", failed=True) == "forecast-failed-2014-05-nlstm-epochs=1"


def test_a_replay_is_named_by_its_first_and_last_month():
    assert replay_run_name("2014-03", "2014-05") == "replay-2014-03-to-2014-05"
