from __future__ import annotations

import pytest

from worker.config import ConfigError, Settings, load_settings


def test_defaults_are_valid(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.input_topic == "clicks"
    assert s.min_new_events == 32


def test_env_prefix_is_read(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORKER_MIN_NEW_EVENTS", "64")
    clean_env.setenv("WORKER_INPUT_TOPIC", "my-clicks")
    s = load_settings()
    assert (s.min_new_events, s.input_topic) == (64, "my-clicks")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("WORKER_MIN_NEW_EVENTS", "zero"),
        ("WORKER_MIN_NEW_EVENTS", "0"),
        ("WORKER_KAFKA_BOOTSTRAP", "no-port-here"),
        ("WORKER_REDIS_URL", "http://x:1"),
        ("WORKER_DEVICE", "tpu"),
        ("WORKER_HOLDOUT_FRAC", "1.5"),
        ("WORKER_REDIS_PREFIX", "bad:prefix"),
    ],
)
def test_bad_value_names_the_setting(clean_env: pytest.MonkeyPatch, var: str, value: str) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert var in str(err.value)


def test_inconsistent_thresholds_fail_with_names(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORKER_MIN_NEW_EVENTS", "4")
    clean_env.setenv("WORKER_MIN_POSITIVES", "3")
    clean_env.setenv("WORKER_MIN_NEGATIVES", "3")
    with pytest.raises(ConfigError, match="min_positives"):
        load_settings()


def test_password_is_never_echoed(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORKER_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("WORKER_KAFKA_SASL_PASSWORD", "hunter2-secret")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "hunter2-secret" not in str(err.value)
    s = Settings(
        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p4ss"
    )
    assert "p4ss" not in repr(s)


def test_cli_reports_bad_setting_and_exits_2(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    clean_env.setenv("WORKER_REDIS_URL", "nope")
    assert main(["stack", "status"]) == 2
    assert "WORKER_REDIS_URL" in capsys.readouterr().err


def test_secrets_come_from_files_too(clean_env: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    secrets = Path(str(tmp_path))
    (secrets / "worker_kafka_sasl_password").write_text("from-a-file")
    clean_env.setenv("WORKER_SECRETS_DIR", str(secrets))
    clean_env.setenv("WORKER_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("WORKER_KAFKA_SASL_USERNAME", "worker")
    s = load_settings()
    assert s.kafka_sasl_password.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(s)
    clean_env.setenv("WORKER_KAFKA_SASL_PASSWORD", "from-env")
    assert load_settings().kafka_sasl_password.get_secret_value() == "from-env"
    clean_env.setenv("WORKER_SECRETS_DIR", str(secrets / "missing"))
    with pytest.raises(ConfigError, match="WORKER_SECRETS_DIR"):
        load_settings()


def test_settings_env_round_trips(clean_env: pytest.MonkeyPatch) -> None:
    from worker.tools.run_settings import settings_env

    original = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="u",
        kafka_sasl_password="pw",
        min_new_events=40,
    )
    for key, value in settings_env(original, input_topic="other").items():
        clean_env.setenv(key, value)
    again = load_settings()
    assert again.input_topic == "other"
    assert again.model_copy(update={"input_topic": original.input_topic}) == original
