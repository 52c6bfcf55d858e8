"""set-config: validated, persisted atomically, applied live and again after a restart."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from edge.agent.fleet_config import CONFIG_FILE, RemoteConfig, load_config, parse_changes, save_config
from edge.errors import ConfigError
from edge.protocol.topics import Command
from tests.agent.fleet.helpers import Controller


@pytest.mark.parametrize("args, words", [
    ({}, "names no setting"),
    ({"colour": "red", "telemetry_interval": 5}, "unknown setting(s) colour (valid: telemetry_interval, download_rate_kb)"),
    ({"telemetry_interval": 0.5}, "telemetry_interval must be a number from 1 to 3600 (seconds), got 0.5"),
    ({"telemetry_interval": 3601}, "from 1 to 3600"),
    ({"telemetry_interval": "30"}, "got '30'"),
    ({"telemetry_interval": True}, "got True"),
    ({"telemetry_interval": math.nan}, "got nan"),
    ({"download_rate_kb": -1}, "download_rate_kb must be a number from 0 to 10485760 (KiB/s, 0 for no cap)"),
    ({"download_rate_kb": math.inf}, "got inf"),
])
def test_bad_settings_are_refused_whole_with_what_is_valid(args, words) -> None:
    with pytest.raises(ConfigError) as err:
        parse_changes(args)
    assert words in str(err.value)


def test_values_merge_null_forgets_and_the_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILE
    assert load_config(path) == RemoteConfig()  # no file: nothing set
    config = RemoteConfig().merged(parse_changes({"telemetry_interval": 30, "download_rate_kb": 0}))
    save_config(path, config)
    assert json.loads(path.read_text()) == {"schema_version": 1, "telemetry_interval": 30.0, "download_rate_kb": 0.0}
    assert load_config(path) == config
    assert (config.interval(5.0), config.rate(1000.0)) == (30.0, None)  # 0: the cap is lifted
    config = config.merged(parse_changes({"telemetry_interval": None, "download_rate_kb": 512}))
    assert (config.interval(5.0), config.rate(None)) == (5.0, 512 * 1024)  # null: the agent's own option again


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema_version": 2}',
                                     '{"schema_version": 1, "colour": 1}', '{"schema_version": 1, "telemetry_interval": -5}'])
def test_an_unreadable_file_is_logged_and_ignored(tmp_path: Path, content: str, caplog) -> None:
    path = tmp_path / CONFIG_FILE
    path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="edge.agent.fleet_config"):
        assert load_config(path) == RemoteConfig()
    assert str(path) in caplog.text and "ignoring the controller's settings" in caplog.text


def test_set_config_survives_a_restart_of_the_link(controller: Controller, device, links) -> None:
    agent = device("dev-1")
    link = links(agent, download_rate=2048.0)  # the agent's own options: 0.5 s, 2 KiB/s
    first = controller.response(controller.command(Command.SET_CONFIG, {"telemetry_interval": 7, "download_rate_kb": 64}))
    assert first.ok and first.result == {"telemetry_interval": 7.0, "download_rate_kb": 64.0}
    assert link.deployer.rate == 64 * 1024
    bad = controller.response(controller.command(Command.SET_CONFIG, {"telemetry_interval": 7, "download_rate_kb": "fast"}))
    assert not bad.ok and bad.error_code == "config_invalid" and "download_rate_kb" in bad.error
    link.stop()

    link = links(agent, download_rate=2048.0)  # the same options again: the controller's values win
    pong = controller.response(controller.command(Command.PING))
    assert pong.result["config"] == {"telemetry_interval": 7.0, "download_rate_kb": 64.0}
    assert link.deployer.rate == 64 * 1024
    back = controller.response(controller.command(Command.SET_CONFIG, {"telemetry_interval": None, "download_rate_kb": None}))
    assert back.ok and back.result == {"telemetry_interval": 0.5, "download_rate_kb": 2.0}
    assert json.loads((agent.data_dir / "fleet" / CONFIG_FILE).read_text()) == {"schema_version": 1}
