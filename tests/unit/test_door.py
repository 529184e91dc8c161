"""The door's rules, pure: which repo URLs a push may name, which values a message may hold,
and a group commit that one message's bad data cannot sink."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, cast

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cistate.adapters.postgres.store import Append, OutboxRow
from cistate.config import RepoSettings
from cistate.domain.messages import _problem, storable_problem
from cistate.domain.repos import RepoPolicy
from cistate.service.orchestrator import GroupCommit

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("url", [
    "https://git.example.com/acme/app.git", "http://10.0.0.1/app.git", "ssh://git@h/app",
    "git://127.0.0.1:9418/app.git", "git@github.com:acme/app.git", "github.com:acme/app"])
def test_remote_urls_are_allowed(url: str) -> None:
    assert RepoPolicy().problem(url) is None


@pytest.mark.parametrize(("url", "reason"), [
    ("/srv/git/app.git", "path on the worker's disk"),
    ("file:///srv/git/app.git", "path on the worker's disk"),
    ("../other-run/source", "path on the worker's disk"),
    ("ext::sh -c touch% /tmp/pwned", "runs commands"),
    ("fd::17", "runs commands"),
    ("ftp://h/app.git", "scheme"),
    ("-uhelp", "not a usable git URL"),
])
def test_local_and_strange_urls_are_refused_saying_why(url: str, reason: str) -> None:
    problem = RepoPolicy().problem(url)
    assert problem is not None and reason in problem


def test_the_allow_list_decides_alone_when_set_and_credentials_are_not_shown() -> None:
    policy = RepoSettings(repo_allow="https://git.example.com/acme/*, /srv/git/*").policy
    assert policy.problem("https://bot:pw@git.example.com/acme/app.git") is None
    assert policy.problem("/srv/git/app.git") is None
    refused = policy.problem("https://bot:pw@github.com/evil/app.git")
    assert refused is not None and "CISTATE_REPO_ALLOW" in refused and "pw" not in refused
    assert RepoPolicy(allow_local=True).problem("/srv/git/app.git") is None
    assert RepoPolicy(allow_local=True).problem("ext::sh") is not None


@pytest.mark.parametrize(("data", "where"), [
    ({"repo": "a\x00b"}, "repo: contains a NUL"),
    ({"outputs": {"k": ["ok", "\ud800"]}}, "outputs.k[1]: contains a lone"),
    ({"outputs": {"n": 2**64}}, "outputs.n: integer"),
    ({"outputs": {"bad\x00key": 1}}, "(the key)"),
])
def test_values_postgresql_cannot_store_are_named_where_they_are(
        data: dict[str, Any], where: str) -> None:
    problem = storable_problem(data)
    assert problem is not None and where in problem


def test_ordinary_values_are_storable() -> None:
    assert storable_problem({"a": [1, 2.5, None, True, "ünïcode ✓"], "b": {"c": -(2**63)}}) is None


class PoisonStore:
    """An in-memory stand-in for Store.append_many that refuses, as PostgreSQL does, any
    statement holding a poisoned append."""

    def __init__(self) -> None:
        self.committed: list[Append] = []

    async def append_many(self, items: Sequence[Append]) -> list[list[OutboxRow]]:
        if any(item.message_id.int == 0 for item in items):
            raise asyncpg.DataError("unsupported Unicode escape sequence")
        self.committed.extend(items)
        return [[] for _ in items]


def append(message_id: uuid.UUID) -> Append:
    return cast(Append, type("FakeAppend", (), {"message_id": message_id})())


async def test_one_bad_message_in_a_group_commit_fails_alone() -> None:
    store = PoisonStore()
    commits = GroupCommit(store)  # type: ignore[arg-type]
    good = [append(uuid.uuid4()) for _ in range(3)]
    poisoned = append(uuid.UUID(int=0))
    outcomes = await asyncio.gather(*(commits.append(item) for item in [*good, poisoned]),
                                    return_exceptions=True)
    assert outcomes[:3] == [[], [], []]
    assert isinstance(outcomes[3], asyncpg.DataError)
    assert store.committed == good


class SlowStore:
    """Holds each statement open until the test lets it go, noting what each carried."""

    def __init__(self) -> None:
        self.statements: list[list[uuid.UUID]] = []
        self.open = 0
        self.most_open = 0
        self.go = asyncio.Event()

    async def append_many(self, items: list[Append]) -> list[list[object]]:
        self.statements.append([item.message_id for item in items])
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        await self.go.wait()
        self.open -= 1
        return [[] for _ in items]


async def test_decisions_made_while_statements_run_are_stored_together_after_them() -> None:
    store = SlowStore()
    commits = GroupCommit(store, max_batch=4, max_in_flight=2)  # type: ignore[arg-type]
    first = [asyncio.create_task(commits.append(append(uuid.uuid4()))) for _ in range(2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first statement has started, holding both
    later = [append(uuid.uuid4()) for _ in range(9)]
    waiting = []
    for item in later:  # one a turn, as deliveries come while the statement runs
        waiting.append(asyncio.create_task(commits.append(item)))
        await asyncio.sleep(0)
    assert store.open == 2  # the second statement took the first later one; the rest wait
    store.go.set()
    assert await asyncio.gather(*first, *waiting) == [[]] * 11
    assert store.most_open == 2
    ids = [item.message_id for item in later]
    assert store.statements[1:] == [ids[:1], ids[1:5], ids[5:9]]  # max_batch each
    assert commits.statements == 4


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False)
    | st.integers(min_value=-(2**65), max_value=2**65) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12)


@given(_JSONISH)
def test_the_fast_check_refuses_exactly_what_the_named_walk_refuses(data: Any) -> None:
    assert (storable_problem(data) is None) == (_problem(data) is None)


@pytest.mark.parametrize("levels", [63, 64, 65, 66])
def test_nesting_is_refused_past_the_same_depth_either_way(levels: int) -> None:
    for leaf in (1, "x", [], {}):
        data: Any = leaf
        for _ in range(levels):
            data = [data]
        assert (storable_problem(data) is None) == (_problem(data) is None)
        wrapped: Any = leaf
        for _ in range(levels):
            wrapped = {"k": wrapped}
        assert (storable_problem(wrapped) is None) == (_problem(wrapped) is None)
