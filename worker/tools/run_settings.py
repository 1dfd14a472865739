"""Settings a tool derives from the worker's: a run's own topics and prefix (`isolated`), the `WORKER_*`
environment of a child process (`settings_env`), the README's settings table (`settings_table`). Not the
running worker's concern, so not in `worker.config`, which stays the one settings class and its loading."""

from __future__ import annotations

from pydantic import SecretStr

from worker.config import Settings


def settings_table() -> str:
    """The README's settings table, generated so it cannot drift from the class (a test compares them)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, SecretStr):
            default = "(secret)" if default.get_secret_value() else ""
        elif default is None:
            default = "(none)"
        shown = f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `WORKER_{name.upper()}` | {shown} | {info.description or ''} |")
    return "\n".join(rows)


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """The `WORKER_*` variables that make a child process load exactly `settings` plus `overrides`:
    how the demo, the benchmarks and the tests start real worker processes."""
    values = {name: getattr(settings, name) for name in Settings.model_fields}
    values.update(overrides)
    env = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"WORKER_{name.upper()}"] = str(value)
    return env


def isolated(settings: Settings, run_id: str, **overrides: object) -> Settings:
    """Topics, consumer group, Redis prefix and model store of a run's own (a demo, a benchmark), so it
    mixes with nothing else on the same stack; `overrides` (typed values) are applied on top."""
    return settings.model_copy(
        update={
            "input_topic": f"{run_id}-clicks",
            "dlq_topic": f"{run_id}-clicks-dlq",
            "scores_topic": f"{run_id}-scores",
            "versions_topic": f"{run_id}-model-versions",
            "requests_topic": f"{run_id}-score-requests",
            "group_id": run_id,
            "redis_prefix": run_id,
            "model_store": settings.cache_dir / "runs" / run_id / "models",
            **overrides,
        }
    )
