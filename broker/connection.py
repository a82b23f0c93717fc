"""One Redis URL for every topology genq runs on, through redis-py's own clients.

``GENQ_REDIS_URL`` forms:

=====================================================================================  ==========
URL                                                                                    topology
=====================================================================================  ==========
``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` TLS, ``unix://path``)     standalone
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``        Sentinel
``redis+cluster://[[user]:password@]host:port[,host:port...]``                          Cluster
=====================================================================================  ==========

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS. On Sentinel the password is the
data nodes'; the sentinels' own come as ``?sentinel_password=...`` (and ``sentinel_username``);
a sentinel's port defaults to 26379. Cluster hosts are seed nodes: the client learns the rest.

Failover: Sentinel's pool asks the sentinels for the master on every new connection and
turns ``READONLY`` from a demoted master into a reconnect; the cluster client refreshes its
slot map on ``MOVED`` and on connection errors. Their retries are kept to a few seconds, so a
call during a switch fails as :class:`broker.errors.Unavailable` rather than hanging, and the
next call finds the new master or slot owner by itself.

Pub/sub: the asyncio cluster client of redis-py 5.3 has no pub/sub (nor ``SSUBSCRIBE``), so
:class:`ClusterClient` opens a plain subscriber connection to one node: Redis Cluster
broadcasts ``PUBLISH`` (run by the Lua scripts on the queue's slot owner) to every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, NodesManager, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry  # not redis.retry's: an asyncio client awaits its call_with_retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY, get_node_name
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import BadRedisUrl
from broker.packing import HiredisPacking, PackedSentinelConnection, PackedSentinelSSLConnection, packed_class

T = TypeVar("T")

Kind = Literal["standalone", "sentinel", "cluster"]
SENTINEL_PORT = 26379
_OPTIONS = frozenset({"sentinel_password", "sentinel_username", "ssl_cert_reqs", "ssl_ca_certs"})
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a ``GENQ_REDIS_URL`` names (see the module docstring)."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster seed nodes
    service: str = ""  # Sentinel's name for the master
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a ``GENQ_REDIS_URL``; raises :class:`BadRedisUrl` saying what is wrong."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise BadRedisUrl(url, "expected <scheme>://..., e.g. redis://host:6379/0")
    if scheme not in _SCHEMES:
        try:
            parse_url(url)
        except ValueError as e:
            raise BadRedisUrl(url, f"{e}, redis+sentinel:// or redis+cluster://") from None
        return RedisTarget("standalone", url)
    kind, tls = _SCHEMES[scheme]
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_host_port(url, h, SENTINEL_PORT if kind == "sentinel" else None) for h in hosts.split(","))
    options = tuple(parse_qsl(parts.query, keep_blank_values=True))
    if unknown := {k for k, _ in options} - _OPTIONS:
        raise BadRedisUrl(url, f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_OPTIONS))}")
    path = [unquote(p) for p in parts.path.split("/") if p]
    service, db = "", 0
    if kind == "sentinel":
        if not path or len(path) > 2:
            raise BadRedisUrl(url, "a Sentinel URL ends with /<service name>[/<db>]")
        service, db = path[0], _db(url, path[1] if len(path) > 1 else "0")
    elif path and (len(path) > 1 or _db(url, path[0]) != 0):
        raise BadRedisUrl(url, "Redis Cluster has only database 0")
    return RedisTarget(
        kind,
        url,
        nodes,
        service,
        db,
        unquote(username) or None,
        unquote(password) or None,
        tls,
        options,
    )


def _host_port(url: str, spec: str, default_port: int | None) -> tuple[str, int]:
    host, port = spec, ""
    if spec.startswith("["):  # [IPv6]:port
        host, _, port = spec[1:].partition("]")
        port = port.removeprefix(":")
    elif ":" in spec:
        host, _, port = spec.rpartition(":")
    if not host:
        raise BadRedisUrl(url, f"empty host in {spec!r}")
    if not port and default_port is None:
        raise BadRedisUrl(url, f"{spec!r} needs a port (host:port)")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise BadRedisUrl(url, f"bad port in {spec!r}") from None
    if number is None or not 0 < number < 65536:
        raise BadRedisUrl(url, f"bad port in {spec!r}")
    return host, number


def _db(url: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRedisUrl(url, f"the database must be a number, not {text!r}") from None


# -- clients -------------------------------------------------------------------------------------
# The builtin ConnectionError too (refused, reset): redis-py retries a failed connect only on
# these errors, and a pool's first connect to a restarting server fails with a refusal.
RETRY_ON = [RedisConnectionError, RedisTimeoutError, ConnectionError]


class DeadlineRetry(Retry):
    """redis-py's Retry bounded by time instead of a count: redis-py retries a connect inside
    a command's retry, so counts multiply (20 tries of 20 tries: a call hung 6 minutes on a dead
    Redis); a deadline per call holds the nested retries to about ``budget_s`` in all.
    Back-off: 0.1 s, doubling, at most ``cap_s``."""

    __slots__ = ("budget_s", "cap_s")

    def __init__(self, budget_s: float, cap_s: float) -> None:
        super().__init__(NoBackoff(), retries=-1)
        self.budget_s, self.cap_s = budget_s, cap_s

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[[Any], Any]) -> T:
        deadline = time.monotonic() + self.budget_s
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                failures += 1
                await fail(error)
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise
                await asyncio.sleep(min(self.cap_s, 0.05 * 2 ** min(failures, 10), left_s))


class _RetriedHandshake(AbstractConnection):
    """redis-py retries a connection's TCP connect but not its handshake (``CLIENT SETINFO``
    ...), and a pool opens a connection outside the command's retry: a server dying or
    starting just then failed the call at once. Here the whole connect is retried."""

    async def connect(self) -> None:
        await self.retry.call_with_retry(super().connect, lambda error: self.disconnect())


class RetriedConnection(HiredisPacking, _RetriedHandshake, Connection):
    pass


class RetriedSSLConnection(HiredisPacking, _RetriedHandshake, SSLConnection):
    pass


class RetriedUnixConnection(HiredisPacking, _RetriedHandshake, UnixDomainSocketConnection):
    pass


def _retried_class(url: str) -> type[AbstractConnection]:
    cls = parse_url(url).get("connection_class", Connection)
    if issubclass(cls, SSLConnection):
        return RetriedSSLConnection
    if issubclass(cls, UnixDomainSocketConnection):
        return RetriedUnixConnection
    return RetriedConnection


def _short_retry(budget_s: float) -> Retry:
    """A few seconds of retries: a failover answers Unavailable soon, then heals by itself."""
    return DeadlineRetry(budget_s, cap_s=0.5)


class SentinelMaster(Redis):
    """The master of a Sentinel service; closing it also closes the connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()


class FailoverAwarePool(SentinelConnectionPool):
    """Sentinel's pool, re-asking the sentinels for the master at most once a second.

    redis-py asks only when it opens a connection, so after ``SENTINEL FAILOVER`` pooled
    connections would keep writing to the old master (still a master until the sentinel
    demotes it, seconds later: those writes are then lost). Here a connection to a server
    that is no longer the master is reopened to the new one before it is handed out.
    """

    recheck_s = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._checked_at = 0.0

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                # closes the idle connections if the master moved
                await self.get_master_address()  # type: ignore[no-untyped-call]
        conn = await super().get_connection(*args, **options)
        if self.master_address is not None and (conn.host, conn.port) != tuple(self.master_address):
            try:
                await conn.disconnect()
                await conn.connect()  # to the master the sentinels name now
            except BaseException:
                await self.release(conn)
                raise
        return conn


class ClusterPipelineWithScripts(ClusterPipeline):
    """A cluster pipeline that takes registered scripts as the standalone one does.

    ``AsyncScript(..., client=pipe)`` awaits ``pipe.evalsha(...)``; the stock cluster pipeline's
    ``__await__`` would empty the pipeline. Scripts missing on a primary (one just promoted) are
    loaded before the pipeline runs, as redis-py's standalone pipeline does.
    """

    _client: ClusterClient
    connection_pool: Any  # for the type checker only, as on ClusterClient

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        # redis-py blocks scripts in cluster pipelines, as a script's keys might span slots;
        # genq's share one hash tag, and the pipeline routes EVALSHA by its first key.
        self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)
        return self

    def __await__(self) -> Generator[Any, None, ClusterPipelineWithScripts]:
        return self._itself().__await__()

    async def _itself(self) -> ClusterPipelineWithScripts:
        return self

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        stack = list(self._command_stack)
        shas = sorted({str(c.args[1]) for c in stack if str(c.args[0]).upper() == "EVALSHA"})
        if shas:
            await self._client.ensure_scripts(shas)
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except NoScriptError:  # a primary promoted between the check and the run
            await self._client.ensure_scripts(shas, force=True)
            self._command_stack = stack
            return await super().execute(raise_on_error, allow_redirections)


class SlotMapNodes(NodesManager):
    """redis-py's slot map, taking a second ``MOVED`` to the same new owner as a no-op.

    When a slot's owner changes (a migration, a failover), every call in flight to the old
    owner answers ``MOVED``. redis-py applies each: the first records the new owner, the next
    finds that owner already in the slot's list, takes it for a replica being promoted, and
    marks the new owner itself a *replica*. It then drops out of the primaries, which ``SCRIPT LOAD``,
    ``SCRIPT EXISTS`` and ``SCAN`` address: every script not yet on the new owner answers
    ``NOSCRIPT`` there until the process restarts.
    """

    __slots__ = ()

    def _update_moved_slots(self) -> None:
        e = self._moved_exception  # set whenever this runs
        nodes = self.slots_cache.get(e.slot_id)
        if nodes and nodes[0].name == get_node_name(e.host, e.port):
            nodes[0].server_type = PRIMARY
            self._moved_exception = None  # type: ignore[assignment]  # as redis-py resets it
            return
        super()._update_moved_slots()


class ClusterClient(RedisCluster):
    """redis-py's cluster client, with what the broker needs of a standalone one.

    Pipelines take scripts (all keys of a queue share one slot, so a pipeline goes to one
    node); ``pubsub()`` subscribes on one node (``PUBLISH`` reaches every node);
    ``pubsub_numsub`` counts the subscribers of every node.
    """

    # redis-py's AsyncScript asks for ``connection_pool`` and falls back to the cluster's
    # encoder when it is missing; declared for the type checker only, never set.
    connection_pool: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes_manager.__class__ = SlotMapNodes  # built by RedisCluster.__init__; state unchanged
        # hiredis packs the commands (broker.packing): the nodes known now and those found later
        # (the nodes manager builds them from the same connection_kwargs); none is connected yet
        packed = packed_class(self.connection_kwargs["connection_class"])
        self.connection_kwargs["connection_class"] = packed
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = packed
        self.script_sources: dict[str, str] = {}  # sha -> source, filled by Scripts.register

    async def ensure_scripts(self, shas: list[str], *, force: bool = False) -> None:
        present = [False] * len(shas) if force else await self.script_exists(*shas)
        for sha, ok in zip(shas, present, strict=True):
            if not ok and sha in self.script_sources:
                await self.script_load(self.script_sources[sha])

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipelineWithScripts:
        super().pipeline(transaction, shard_hint)  # refuses a transaction, as redis-py does
        return ClusterPipelineWithScripts(self)

    def pubsub(self, **kwargs: Any) -> PubSub:
        """A subscriber on a random known node (callers re-open one after a connection loss)."""
        node: ClusterNode = random.choice(list(self.nodes_manager.nodes_cache.values()))
        pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        return PubSub(pool, **kwargs)

    async def pubsub_numsub(self, *channels: str) -> list[tuple[str, int]]:
        """Subscribers per channel, summed over every node (a subscriber may be on any)."""
        reply: list[tuple[str, int]] = await self.execute_command(
            "PUBSUB NUMSUB", *channels, target_nodes=RedisCluster.ALL_NODES
        )
        return reply


RedisClient: TypeAlias = Redis | ClusterClient


def connect_redis(url: str, **kw: Any) -> RedisClient:
    """A pooled asyncio client for ``url`` (see the module docstring for the forms).

    Standalone: rides out short Redis restarts (about 15 s of retries). Sentinel and
    Cluster: a few seconds, then Unavailable; the next call finds the new master.
    Raises :class:`BadRedisUrl`.
    """
    target = parse_redis_url(url)
    common: dict[str, Any] = {"decode_responses": True, "health_check_interval": 10}
    if target.tls:
        common["ssl"] = True
        for name in ("ssl_cert_reqs", "ssl_ca_certs"):
            if (value := target.option(name)) is not None:
                common[name] = value
    if target.kind == "standalone":
        client: Redis = Redis.from_url(  # from_url is unannotated in redis-py
            url,
            decode_responses=True,
            retry=DeadlineRetry(15.0, cap_s=1.0),
            connection_class=_retried_class(url),
            retry_on_error=RETRY_ON,
            health_check_interval=10,
            **kw,
        )
        return client
    common |= {"username": target.username, "password": target.password, "retry_on_error": RETRY_ON, **kw}
    if target.kind == "sentinel":
        sentinel_kwargs = {
            "username": target.option("sentinel_username"),
            "password": target.option("sentinel_password"),
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            **({k: v for k, v in common.items() if k.startswith("ssl")}),
        }
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
        tls = common.pop("ssl", False)  # the pool reads it only to pick the class named here
        master: Redis = sentinel.master_for(
            target.service,
            redis_class=SentinelMaster,
            connection_pool_class=FailoverAwarePool,
            connection_class=PackedSentinelSSLConnection if tls else PackedSentinelConnection,
            db=target.db,
            retry=_short_retry(3.0),
            **common,
        )
        return master
    return ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        retry=_short_retry(1.0),
        cluster_error_retry_attempts=6,
        **common,
    )


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def wait_replicas(client: RedisClient, pipe: Any, key: str, replicas: int, timeout_ms: int) -> None:
    """Queue ``WAIT`` after the writes in ``pipe``: on the same connection, so it waits for them
    (on a cluster, on the node that owns ``key``, where the writes went)."""
    if isinstance(client, RedisCluster):
        pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=client.get_node_from_key(key))
    else:
        pipe.execute_command("WAIT", replicas, timeout_ms)
