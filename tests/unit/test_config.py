"""wshub.config and the serve command line: sources, precedence, refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wshub.cli import build_config, main
from wshub.config import OPTIONS, Config, ConfigError, load_config, option_reference


def test_defaults_match_decisions() -> None:
    c = Config()
    assert (c.host, c.port) == ("127.0.0.1", 8787)
    assert c.heartbeat_interval == 30 and c.effective_heartbeat_timeout == 70
    assert c.sweep_interval == 30
    assert (c.message_rate, c.message_burst) == (20, 40)
    assert (c.rate_limit_refusals, c.rate_limit_window) == (10, 10)
    assert (c.ip_connect_rate, c.max_connections_per_ip, c.max_connections) == (20, 200, 10000)
    assert c.max_message_size == 65536 and c.send_buffer_limit == 1 << 20
    assert c.handshake_timeout == 10 and c.drain_timeout == 10
    assert c.compression == "off" and c.allowed_origins == () and c.trusted_proxies == ()


def test_every_option_has_flag_env_and_help() -> None:
    names = {option.flag for option in OPTIONS}
    for flag in (
        "--host",
        "--port",
        "--heartbeat-interval",
        "--heartbeat-timeout",
        "--sweep-interval",
        "--message-rate",
        "--message-burst",
        "--ip-connect-rate",
        "--max-connections-per-ip",
        "--max-connections",
        "--allowed-origins",
        "--trusted-proxies",
        "--max-message-size",
        "--send-buffer-limit",
        "--drain-timeout",
        "--compression",
        "--log-level",
        "--log-format",
    ):
        assert flag in names
    assert all(option.help and option.env.startswith("WSHUB_") for option in OPTIONS)
    assert "`WSHUB_HEARTBEAT_INTERVAL`" in option_reference()


def test_io_uring_is_auto_unless_turned_off_by_flag_env_or_file(tmp_path) -> None:
    assert Config().io_uring == "auto"
    assert build_config(["--io-uring", "off"], {}).io_uring == "off"
    assert build_config([], {"WSHUB_IO_URING": "off"}).io_uring == "off"
    path = tmp_path / "wshub.toml"
    path.write_text('io-uring = "off"\n')
    assert build_config(["--config", str(path)], {}).io_uring == "off"


def test_precedence_flag_over_env_over_file(tmp_path) -> None:
    path = tmp_path / "wshub.toml"
    path.write_text(
        "port = 9000\nheartbeat-interval = 5\nmessage_rate = 3.5\n"
        'allowed-origins = ["https://a.example"]\n'
    )
    env = {"WSHUB_PORT": "9100", "WSHUB_HEARTBEAT_INTERVAL": "0.5"}
    c = build_config(["--config", str(path), "--port", "9200"], env)
    assert c.port == 9200  # flag
    assert c.heartbeat_interval == 0.5  # environment
    assert c.message_rate == 3.5  # file
    assert c.allowed_origins == ("https://a.example",)
    assert build_config([], {"WSHUB_CONFIG": str(path)}).port == 9000


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        ([], {"WSHUB_HEARTBEAT_INTERVAL": "-1"}, "--heartbeat-interval"),
        ([], {"WSHUB_MESSAGE_RATE": "nan"}, "--message-rate"),
        (["--compression", "maybe"], {}, "--compression"),
        ([], {"WSHUB_IO_URING": "on"}, "--io-uring"),  # auto or off
        (["--allowed-origins", "example.com"], {}, "--allowed-origins"),
        (["--trusted-proxies", "10.0.0.0/33"], {}, "--trusted-proxies"),
        (["--max-message-size", "0"], {}, "--max-message-size"),
        (["--heartbeat-interval", "30", "--heartbeat-timeout", "20"], {}, "--heartbeat-timeout"),
    ],
)
def test_bad_values_name_the_option(flags: list[str], env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(flags, env)
    assert named in str(info.value)


def test_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(["--config", str(bad)], {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        build_config(["--config", str(unknown)], {})
    with pytest.raises(ConfigError, match="cannot read"):
        build_config(["--config", str(tmp_path / "missing.toml")], {})
    with pytest.raises(ConfigError, match="--port"):
        load_config({}, {}, {"port": True})


def test_serve_refuses_bad_value_at_start() -> None:
    """The real command exits with status 2 and names the option."""
    result = subprocess.run(
        [sys.executable, "-m", "wshub", "serve", "--max-connections", "many"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--max-connections" in result.stderr and "many" in result.stderr


def test_main_help_and_unknown(capsys) -> None:
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert main(["--version"]) == 0


def test_configuration_doc_is_current() -> None:
    """docs/configuration.md is generated from config.py and must match it."""
    from pathlib import Path

    from wshub.docgen import configuration_md

    doc = Path(__file__).parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_md(), (
        "regenerate: python -m wshub.docgen > docs/configuration.md"
    )


def test_redis_sentinels_become_the_redis_target() -> None:
    """--redis-sentinels and --redis-master: one target that every Redis
    client of the node is made from (backplane/redisconn.py reads it back)."""
    from wshub.backplane.redisconn import parse_sentinel_target

    c = build_config(
        ["--redis-sentinels", "127.0.0.1:26379, [::1]:26380", "--redis-master", "mymaster"], {}
    )
    assert c.redis_sentinels == ("127.0.0.1:26379", "[::1]:26380")
    assert c.redis_target == "redis+sentinel://127.0.0.1:26379,[::1]:26380/mymaster"
    assert parse_sentinel_target(c.redis_target) == (
        [("127.0.0.1", 26379), ("::1", 26380)],
        "mymaster",
    )
    env = {"WSHUB_REDIS_SENTINELS": "10.0.0.1:26379", "WSHUB_REDIS_MASTER": "m"}
    assert build_config([], env).redis_target == "redis+sentinel://10.0.0.1:26379/m"
    plain = build_config(["--redis-url", "redis://127.0.0.1:6379/0"], {})
    assert plain.redis_target == "redis://127.0.0.1:6379/0"
    assert build_config([], {}).redis_target == ""
    # Two workers share one hub through the sentinels' primary as well.
    assert build_config(["--workers", "2", *c_flags()], {}).workers == 2


def c_flags() -> list[str]:
    return ["--redis-sentinels", "127.0.0.1:26379", "--redis-master", "m"]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--redis-sentinels", "127.0.0.1:26379"], "--redis-sentinels: needs --redis-master"),
        (["--redis-master", "m"], "--redis-master: only means something with --redis-sentinels"),
        ([*c_flags(), "--redis-url", "redis://h:6379"], "--redis-sentinels and --redis-url"),
        (["--redis-sentinels", "h", "--redis-master", "m"], "--redis-sentinels (flag)"),
        (["--redis-sentinels", "h:99999", "--redis-master", "m"], "--redis-sentinels (flag)"),
        (["--redis-sentinels", "h:1", "--redis-master", "a b"], "--redis-master (flag)"),
    ],
)
def test_redis_sentinels_are_checked(flags: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(flags, {})
    assert says in str(info.value)


def test_sentinel_target_is_parsed_back_or_refused() -> None:
    from wshub.backplane.redisconn import describe_target, parse_sentinel_target

    for bad in (
        "redis://h:1/0",
        "redis+sentinel://h:1",
        "redis+sentinel:///m",
        "redis+sentinel://h/m",
    ):
        with pytest.raises(ValueError):
            parse_sentinel_target(bad)
    assert describe_target("redis://:secret@h:6379/0") == "redis://***@h:6379/0"
    assert describe_target("redis+sentinel://h:1/m") == "redis+sentinel://h:1/m"


def test_a_redis_error_is_logged_without_the_password() -> None:
    from wshub.backplane.redisconn import redact

    url = "redis://u:s%21cret@h:6379/0"
    assert redact("AUTH u s!cret refused; s%21cret", url) == "AUTH u *** refused; ***"
    assert redact("Error 111 connecting to h:6379", "redis://h:6379/0") == (
        "Error 111 connecting to h:6379"
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # redis-py would raise at the first connect (a traceback after start)...
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis+cluster://127.0.0.1:99999", "Port out of range"),
        ("redis://127.0.0.1:6379/0?db=x", "'db'"),
        # ...or take database 0 without a word.
        ("redis://127.0.0.1:6379/abc", "the database is a number"),
    ],
)
def test_a_redis_url_that_would_not_connect_as_written_is_refused_at_start(
    url: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        build_config(["--redis-url", url], {})


def test_the_redis_prefix_names_the_database_unless_it_is_0() -> None:
    """Pub/sub channels are not per database: two clusters of one name on two
    databases of one Redis keep apart only by their prefix."""

    def prefix(*flags: str) -> str:
        return build_config([*flags, "--cluster-name", "chat"], {}).redis_prefix

    assert prefix("--redis-url", "redis://h:6379") == "chat"
    assert prefix("--redis-url", "redis://h:6379/0") == "chat"
    assert prefix("--redis-url", "redis://:secret@h:6379/3") == "chat@db3"
    assert prefix("--redis-url", "rediss://h:6379/0?db=2") == "chat@db2"
    assert prefix("--redis-url", "unix:///run/redis.sock?db=5") == "chat@db5"
    assert prefix("--redis-url", "redis+cluster://h:1,h:2") == "chat"
    assert prefix(*c_flags()) == "chat"
    assert prefix() == "chat"
