"""Start-up of the command line: wall time of `cistate --help`, `cistate runs list` and
`cistate runs show RUN` against a real database, with `python -c pass` as the floor and
`python -c "import asyncpg"` as what any reader with asyncpg (and asyncio) starts in.

    python bench/cli.py [--calls 15] [--warmup 2] [--runs 200]

1. Makes a database `cistate_cli_<pid>` of its own, migrates it with `cistate db upgrade`
   (the command, as an operator would) and stores --runs runs of a 4-step `noop` pipeline
   through the real Decider and Store.append: the first step succeeded with outputs, the
   second running, as an orchestrator would have left them.
2. Runs each command --warmup times, then --calls times, one after the other in rounds (so
   that the machine's other load falls on every command alike), each a new process of the
   Python that runs this script: `python -m cistate ...` with PYTHONPATH the checkout this
   script is in, CISTATE_DATABASE_URL the benchmark's database and no other CISTATE_*
   variable. stdout is a pipe (as in a script: no colours). Prints the median, min and p90
   wall time, the median minus the floor, and the target (< 150 ms) met or not.
3. Prints the third-party modules each command loaded (asyncpg, pydantic, rich, ...), from
   one more run of each with a hook that lists sys.modules at exit.

The database is dropped at the end (also on Ctrl-C or an error, unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

TARGET_MS = 150.0
PIPELINE = """\
name: bench-cli
steps:
  - {name: build, uses: noop}
  - {name: test, uses: noop, needs: [build]}
  - {name: package, uses: noop, needs: [test]}
  - {name: deploy, uses: noop, needs: [package]}
"""
# what `-X` cannot tell: the libraries a command loaded, printed by the child at exit
SHOW_MODULES = ("import atexit, sys\n"
                "atexit.register(lambda: print('MODULES', ' '.join(sorted({m.split('.')[0] "
                "for m in sys.modules})), file=sys.stderr))\n"
                "import runpy\n"
                "sys.argv = ['cistate', *sys.argv[1:]]\n"
                "runpy.run_module('cistate', run_name='__main__', alter_sys=True)\n")
WATCHED = ("asyncpg", "aio_pika", "aiormq", "aiohttp", "kubernetes_asyncio", "handlers",
           "transitions", "pydantic", "pydantic_settings", "yaml", "prometheus_client",
           "structlog", "rich", "markdown_it", "pygments", "orjson")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def child_env(dsn: str, tree: Path, no_bytecode: bool) -> dict[str, str]:
    """The environment of a command of the checkout `tree`: the database's URL alone of
    the CISTATE_* variables; bytecode written and read in __pycache__ (as an installed
    package or a used checkout has it) unless `no_bytecode`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CISTATE_")}
    env["CISTATE_DATABASE_URL"] = dsn
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not no_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


async def fill(dsn: str, runs: int) -> list[uuid.UUID]:
    """`runs` runs stored as the orchestrator would: push decided, build succeeded with
    outputs, test running. Returns their ids."""
    import handlers
    from cistate.adapters.postgres.store import connect
    from cistate.domain import run as r
    from cistate.domain.messages import Push, StepResult
    from cistate.domain.pipeline import parse

    decider = r.Decider(parse(PIPELINE, "<bench>", handlers.names()))
    store = await connect(dsn, min_size=1, max_size=4)
    ids: list[uuid.UUID] = []
    start = datetime.now(UTC) - timedelta(hours=1)
    try:
        for i in range(runs):
            delivery = uuid.uuid4()
            state = r.RunState(id=r.run_id_for(delivery))
            now = start + timedelta(seconds=i)
            messages: list[tuple[Push | StepResult, uuid.UUID]] = [(Push(
                repo="https://git.example.com/acme/shop.git", ref="refs/heads/main",
                commit=f"{i:040x}", pusher="bench"), delivery)]
            for message, message_id in messages:
                expected = state.version
                decision = decider.decide(state, message, message_id, now)
                for event in decision.events:
                    r.apply(state, event.type, event.data, now)
                await store.append(state, expected, decision.events, decision.outgoing,
                                   message_id, now, None)
                if state.steps["build"].state == "running":
                    messages.append((StepResult(
                        run_id=state.id, step="build", attempt=state.steps["build"].attempts,
                        status="succeeded", outputs={"image": f"registry/shop:{i}",
                                                     "digest": "sha256:" + "ab" * 32}),
                        uuid.uuid4()))
                    now += timedelta(seconds=2)
            ids.append(state.id)
    finally:
        await store.close()
    return ids


@dataclass
class Call:
    wall_ms: float
    cpu_ms: float  # user + system time of the child: steadier than wall time under load
    stdout: str


def timed(argv: Sequence[str], env: dict[str, str]) -> Call:
    """One run of the command in the checkout its PYTHONPATH starts with (`-m` looks in
    the working directory first), from fork to exit, its output read through a pipe. Its
    CPU time is what the children reaped meanwhile used (this is the only one)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=env["PYTHONPATH"].split(os.pathsep)[0],
                          capture_output=True, text=True, check=False)
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} exited {done.returncode}: "
                           f"{done.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return Call(wall, cpu, done.stdout)


def loaded(args: Sequence[str], env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", SHOW_MODULES, *args], env=env,
                          cwd=env["PYTHONPATH"].split(os.pathsep)[0], capture_output=True,
                          text=True, check=False)
    line = next((x for x in done.stderr.splitlines() if x.startswith("MODULES ")), "")
    names = set(line.split()[1:])
    return [name for name in WATCHED if name in names]


def row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


async def main(args: argparse.Namespace) -> int:
    import asyncpg

    name = f"cistate_cli_{os.getpid()}"
    admin = await asyncpg.connect(args.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_path(args.database_url, "/" + name)
    trees = {"": child_env(dsn, ROOT, args.no_bytecode)}
    if args.baseline:
        trees[" (baseline)"] = child_env(dsn, args.baseline, args.no_bytecode)
    try:
        cistate = [sys.executable, "-m", "cistate"]
        done = timed([*cistate, "db", "upgrade"], trees[""])
        log(f"database {name}: {done.stdout.strip()}")
        ids = await fill(dsn, args.runs)
        log(f"stored {len(ids)} runs")
        show = str(ids[len(ids) // 2])
        commands: list[tuple[str, list[str], dict[str, str], bool]] = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"], trees[""], False),
            ("python -c 'import asyncpg'", [sys.executable, "-c", "import asyncpg"],
             trees[""], False)]
        for suffix, env in trees.items():
            commands += [
                (f"cistate --help{suffix}", [*cistate, "--help"], env, True),
                (f"cistate runs list{suffix}", [*cistate, "runs", "list"], env, True),
                (f"cistate runs show RUN{suffix}", [*cistate, "runs", "show", show], env, True)]
            # the output is the real one: the listing has the newest run, show its steps
            listed = timed([*cistate, "runs", "list"], env)
            assert str(ids[-1]) in listed.stdout, listed.stdout[:500]
            shown = timed([*cistate, "runs", "show", show], env)
            assert "build" in shown.stdout and "succeeded" in shown.stdout, shown.stdout
        calls: dict[str, list[Call]] = {label: [] for label, _, _, _ in commands}
        for i in range(args.warmup + args.calls):
            for label, argv, env, _ in commands:  # in rounds: load falls on each alike
                call = timed(argv, env)
                if i >= args.warmup:
                    calls[label].append(call)
        floor = statistics.median(c.wall_ms for c in calls[commands[0][0]])
        print(f"\nCLI start-up: wall time (ms) of {args.calls} calls each after {args.warmup} "
              f"warm-ups, in rounds; cpu = the child's user + system time; {len(ids)} runs "
              f"stored; {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the end; "
              f"{sys.executable} -m cistate, bytecode "
              f"{'compiled each time' if args.no_bytecode else 'cached'}\n")
        widths = (33, 7, 7, 7, 8, 11, 7, 8)
        print(row(("command", "median", "min", "p90", "cpu med", "over floor", "target",
                   "met"), widths))
        for label, _, _, targeted in commands:
            xs = sorted(c.wall_ms for c in calls[label])
            med = statistics.median(xs)
            p90 = xs[min(len(xs) - 1, round(0.9 * len(xs) + 0.5) - 1)]
            cpu = statistics.median(c.cpu_ms for c in calls[label])
            target = f"< {TARGET_MS:.0f}" if targeted else "-"
            met = ("met" if med < TARGET_MS else "NOT MET") if targeted else "-"
            print(row((label, f"{med:.1f}", f"{xs[0]:.1f}", f"{p90:.1f}", f"{cpu:.1f}",
                       f"{med - floor:+.1f}" if label != commands[0][0] else "", target, met),
                      widths))
        print("\nlibraries loaded (of: " + ", ".join(WATCHED) + "):")
        for label, argv, env, targeted in commands:
            if targeted:
                print(f"  {label:33s} {', '.join(loaded(argv[3:], env)) or '-'}")
        return 0
    finally:
        if args.keep:
            log(f"kept database {name} ({dsn})")
        else:
            admin = await asyncpg.connect(args.database_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=15, help="measured calls per command")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured calls first")
    parser.add_argument("--runs", type=int, default=200, help="runs stored")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database to CREATE/DROP the benchmark's own from")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--baseline", metavar="CHECKOUT", type=lambda v: Path(v).resolve(),
                        help="also measure the commands of this checkout of cistate (e.g. a "
                             "`git worktree` of an older commit), in the same rounds")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE: compile cistate's modules anew "
                             "in every call, as a checkout that cannot write __pycache__")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    try:
        sys.exit(asyncio.run(main(arguments)))
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
