"""The house rules of `worker/`, read from the source: which package may import which.

The packages show the architecture (see the README): `state/` is the Redis side, `stream/` the Kafka side,
`learn/` the models, `ops/` what operators read, `tools/` everything that is not `python -m worker run`.
Each rule is checked on the real tree, and each is shown to fail on a tree that breaks it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "worker"
STATE_MAY = ("worker.config", "worker.events", "worker.state")
OPS_MAY = ("worker.config", "worker.events", "worker.logs", "worker.ops")
CLIENTS = ("redis", "confluent_kafka")
TORCH = ("torch", "transformers", "peft")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> Iterator[str]:
    """Every module `source` imports, at any depth (inside functions too), relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and str(node.value).startswith("worker.tools"):
            yield str(node.value).split()[0]


def read_tree(root: Path) -> dict[str, set[str]]:
    """Module name -> the modules it imports (names that are not modules, like classes, do no harm)."""
    tree = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        tree[name] = set(imports_of(path.read_text(), name, path.name == "__init__.py"))
    return tree


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(tree: Mapping[str, set[str]]) -> list[str]:
    """Every broken rule as `module: rule (import)`."""
    found = []
    for module, imported in tree.items():
        broken: dict[str, str] = {}
        for name in sorted(imported):
            rule = _broken_rule(module, name)
            if rule:
                broken.setdefault(rule, name)
        found.extend(f"{module}: {rule} ({name})" for rule, name in broken.items())
    return found


def _broken_rule(module: str, name: str) -> str | None:
    own = _under(name, "worker") and name != "worker"
    state_ok = any(_under(name, allowed) for allowed in STATE_MAY)
    if _under(module, "worker.state") and own and not state_ok:
        return "state/ imports only config, events and state.keys, state.entry, state.scripts"
    if _under(module, "worker.stream"):
        if _under(name, "worker.learn"):
            return "stream/ never imports learn/"
        if any(_under(name, t) for t in TORCH):
            return "stream/ never imports torch"
    if _under(module, "worker.learn"):
        if _under(name, "worker.stream"):
            return "learn/ never imports stream/"
        if any(_under(name, c) for c in CLIENTS):
            return "learn/ never imports a Kafka or Redis client"
        if _under(name, "worker.state") and module != "worker.learn.learner":
            return "only learn/learner.py touches state/"
    if _under(module, "worker.ops") and own and not any(_under(name, allowed) for allowed in OPS_MAY):
        return "ops/ imports no product package"
    if _under(name, "worker.tools") and not _under(module, "worker.tools") and module != "worker.cli":
        return "nothing outside tools/ imports tools/ (but the command table in cli.py)"
    return None


def test_the_tree_keeps_the_rules() -> None:
    tree = read_tree(PACKAGE)
    assert {
        "worker.state.buffer",
        "worker.stream.ingest",
        "worker.learn.scoring",
        "worker.ops.metrics",
    } <= set(tree)
    assert violations(tree) == []


@pytest.mark.parametrize(
    ("module", "bad_import", "rule"),
    [
        ("worker.state.buffer", "worker.stream.kafka", "state/ imports only"),
        ("worker.state.registry", "worker.learn.click_model", "state/ imports only"),
        ("worker.stream.ingest", "torch", "stream/ never imports torch"),
        ("worker.stream.publish", "worker.learn.scoring", "stream/ never imports learn/"),
        ("worker.learn.train", "redis", "learn/ never imports a Kafka or Redis client"),
        ("worker.learn.scoring", "confluent_kafka", "learn/ never imports a Kafka or Redis client"),
        ("worker.learn.backbone", "worker.stream.kafka", "learn/ never imports stream/"),
        ("worker.learn.train", "worker.state.registry", "only learn/learner.py touches state/"),
        ("worker.ops.metrics", "worker.learn.history", "ops/ imports no product package"),
        ("worker.app", "worker.tools.datasets", "nothing outside tools/ imports tools/"),
    ],
)
def test_each_rule_fails_when_broken(module: str, bad_import: str, rule: str) -> None:
    tree = {name: set(imported) for name, imported in read_tree(PACKAGE).items()}
    tree[module].add(bad_import)
    found = violations(tree)
    assert len(found) == 1 and found[0].startswith(f"{module}: {rule}"), found


def test_a_broken_source_file_is_caught() -> None:
    """The scan reads imports inside functions and relative imports, not just the top of a file."""
    source = (
        "def f():\n"
        "    from ..learn import model\n"
        "    import importlib\n"
        "    importlib.import_module('worker.tools.stack')\n"
    )
    imported = set(imports_of(source, "worker.stream.ingest", is_package=False))
    assert {"worker.learn", "worker.learn.model", "worker.tools.stack"} <= imported
    tree = {"worker.stream.ingest": imported}
    assert len(violations(tree)) == 2


def loaded(modules: tuple[str, ...], candidates: tuple[str, ...]) -> list[str]:
    """Which of `candidates` (packages or modules) a fresh interpreter has loaded after importing
    `modules`: what the source rules mean at run time, third-party imports included."""
    code = (
        f"import sys\nimport {', '.join(modules)}\n"
        f"print(sorted(c for c in {candidates!r}\n"
        "             if any(m == c or m.startswith(c + '.') for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(ast.literal_eval(out.stdout.strip()))


def test_learning_modules_import_no_kafka_or_redis_client() -> None:
    """The model modules, train, the offline evaluation and bench train must run on a GPU machine that has
    neither client."""
    modules = (
        "worker.learn.encoder",
        "worker.learn.backbone",
        "worker.learn.click_model",
        "worker.learn.adapters",
        "worker.learn.scoring",
        "worker.learn.zero_shot",
        "worker.learn.serving",
        "worker.learn.train",
        "worker.tools.evaluation.offline_command",
        "worker.tools.bench.train",
    )
    assert loaded(modules, CLIENTS) == []


def test_trigger_and_pool_import_no_client_torch_or_learner() -> None:
    """The evaluation imports the due rules from stream/trigger and the pool's bounds from state/pool on
    machines without Kafka or Redis clients."""
    forbidden = (*CLIENTS, "torch", "worker.learn", "worker.state.buffer")
    assert loaded(("worker.stream.trigger", "worker.state.pool"), forbidden) == []


def test_running_the_worker_loads_no_tooling() -> None:
    """`python -m worker run` and its modules are what the production image holds: no tools, no plots.
    (rich may load: structlog uses it for tracebacks where it is installed.)"""
    assert loaded(("worker.cli", "worker.app"), ("worker.tools", "matplotlib", "sklearn")) == []


def test_the_loaded_check_can_fail() -> None:
    assert loaded(("worker.state.buffer",), ("redis", "torch")) == ["redis"]


def test_the_worker_runs_from_a_tree_without_tools(tmp_path: Path) -> None:
    """What the production image holds (deploy/Dockerfile removes worker/tools): `run` starts as far as
    its settings, and a tooling command says what is missing instead of a traceback."""
    import shutil
    import sysconfig

    shutil.copytree(PACKAGE, tmp_path / "worker", ignore=shutil.ignore_patterns("tools", "__pycache__"))
    # -S skips site-packages' .pth files (the editable install would find worker/tools in the checkout);
    # the dependencies come in through PYTHONPATH instead.
    env = {"PYTHONPATH": f"{tmp_path}:{sysconfig.get_paths()['purelib']}", "WORKER_DEVICE": "gpu-of-mars"}
    run = subprocess.run(
        [sys.executable, "-S", "-m", "worker", "run"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 2 and "WORKER_DEVICE" in run.stderr, run.stderr
    stack = subprocess.run(
        [sys.executable, "-S", "-m", "worker", "stack", "status"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert stack.returncode == 2, stack.stderr
    assert "tooling (worker.tools.stack)" in stack.stderr and "Traceback" not in stack.stderr


def cycles(tree: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles among the tree's own modules (Tarjan's strongly connected components); imports
    made inside functions count, as `imports_of` reads them."""
    graph = {m: sorted(i for i in imported if i in tree and i != m) for m, imported in tree.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle() -> None:
    assert cycles(read_tree(PACKAGE)) == []
    broken = {"worker.a": {"worker.b"}, "worker.b": {"worker.c"}, "worker.c": {"worker.a"}, "worker.d": set()}
    assert cycles(broken) == [["worker.a", "worker.b", "worker.c"]]
    inside = set(imports_of("def f():\n    from worker import a\n", "worker.b", is_package=False))
    assert cycles({"worker.a": {"worker.b"}, "worker.b": inside}) == [["worker.a", "worker.b"]]


MAX_LINES = 500
"""A module a newcomer can hold in mind (issue #40)."""


def over_limit(root: Path) -> dict[str, int]:
    sizes = {
        p.relative_to(root.parent).as_posix(): len(p.read_text().splitlines()) for p in root.rglob("*.py")
    }
    return {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_no_module_over_500_lines(tmp_path: Path) -> None:
    assert over_limit(PACKAGE) == {}, f"split by concern: over {MAX_LINES} lines"
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert over_limit(tmp_path / "worker") == {"worker/big.py": MAX_LINES + 1}
