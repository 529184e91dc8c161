"""The command line starts fast because it loads only what a command uses (bench/cli.py
times it): its parser is the standard library's, so `cistate --help` loads no third-party
module (no typer, click, rich, pydantic or asyncpg); `runs list` and `runs show` load the
store's reads (asyncpg) but not the store, no pydantic at all, no machine and none of the
service. And a command that is over in a moment runs without the cyclic GC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Runs the command line as `python -m cistate ARGS` would and prints, as it exits, the
# modules it loaded.
CHILD = """
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["cistate", *sys.argv[1:]]
runpy.run_module("cistate", run_name="__main__", alter_sys=True)
"""
# what no read of runs loads
NEVER = ("typer", "click", "pydantic", "aio_pika", "aiormq", "aiohttp", "kubernetes_asyncio",
         "handlers", "transitions", "yaml", "pydantic_settings", "prometheus_client",
         "structlog", "git", "cistate.config", "cistate.bootstrap", "cistate.service",
         "cistate.domain.run", "cistate.domain.messages", "cistate.domain.pipeline",
         "cistate.domain.machine", "cistate.adapters.rabbitmq", "cistate.adapters.http",
         "cistate.adapters.postgres.store", "rich")
NOT_FOR_HELP = (*NEVER, "asyncpg", "asyncio", "orjson", "rich", "cistate.adapters.postgres",
                "cistate.domain")


def loaded(*args: str) -> tuple[int, set[str]]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CISTATE_")}
    # nothing listens on port 1: the command gets as far as connecting
    env["CISTATE_DATABASE_URL"] = "postgresql://cistate@127.0.0.1:1/cistate"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
    return done.returncode, set(json.loads(line.removeprefix("MODULES ")))


def among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


def third_party(modules: set[str]) -> list[str]:
    """The modules neither of the standard library nor cistate's (nor what the site loads
    before any program: sitecustomize, an editable install's finder)."""
    tops = {m.split(".")[0] for m in modules}
    return sorted(m for m in tops - sys.stdlib_module_names - {"cistate", "sitecustomize"}
                  if not m.startswith("_"))


def test_help_loads_no_third_party_module() -> None:
    code, modules = loaded("--help")
    assert code == 0
    assert among(modules, NOT_FOR_HELP) == []
    assert third_party(modules) == []


def test_every_help_loads_no_third_party_module() -> None:
    for args in (("runs", "--help"), ("runs", "list", "--help"), ("audit", "verify", "--help"),
                 ("push", "--help"), ("serve", "--help")):
        code, modules = loaded(*args)
        assert code == 0, args
        assert among(modules, NOT_FOR_HELP) == [], args
        assert third_party(modules) == [], args


def test_importing_the_command_line_loads_no_third_party_module() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys, cistate.adapters.cli.main; "
         "print(json.dumps(sorted(sys.modules)))"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    modules = set(json.loads(done.stdout))
    assert among(modules, NOT_FOR_HELP) == []
    assert third_party(modules) == []


@pytest.mark.parametrize("args", [("runs", "list"),
                                  ("runs", "show", "7d2b0c8e-51a6-5a8e-9d0e-3f1c2b4a5e6f")])
def test_reading_runs_loads_the_reads_but_not_the_store_a_model_or_the_service(
        args: tuple[str, ...]) -> None:
    code, modules = loaded(*args)
    assert code == 1  # cannot connect: it got as far as the database
    assert {"asyncpg", "cistate.adapters.postgres.reads", "cistate.domain.state"} <= modules
    assert among(modules, NEVER) == []


# Runs the command line as the program and prints, as it exits, whether the cyclic GC ran.
GC_CHILD = """
import atexit, gc, runpy, sys
atexit.register(lambda: print(f"GC {gc.isenabled()} {gc.get_freeze_count() > 0}",
                              file=sys.stderr))
sys.argv = ["cistate", *sys.argv[1:]]
runpy.run_module("cistate", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("args", "collected"), [
    (("--help",), False), (("runs", "list"), False),
    (("runs", "show", "7d2b0c8e-51a6-5a8e-9d0e-3f1c2b4a5e6f"), False),
    (("runs", "watch", "7d2b0c8e-51a6-5a8e-9d0e-3f1c2b4a5e6f"), True),
    (("projections", "rebuild"), True)])
def test_a_moment_runs_without_the_cyclic_gc_and_what_may_last_collects(
        args: tuple[str, ...], collected: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CISTATE_")}
    env["CISTATE_DATABASE_URL"] = "postgresql://cistate@127.0.0.1:1/cistate"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", GC_CHILD, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    line = next(x for x in done.stderr.splitlines() if x.startswith("GC "))
    # a moment's objects are frozen out of the collection the interpreter makes at exit
    assert line == (f"GC {collected} {not collected}"), done.stderr[-500:]
