"""Redis clients from a URL: one place that knows a single Redis from a Redis Cluster.

Every Redis client of the runtime (the backpressure publisher, the producer's signal reader,
the operator's reader of the signal; the idempotency store's cluster client) is built here, so the way a
user says "this is a cluster" is the same everywhere: the URL's scheme.

    redis://[user:password@]host:port/db          one Redis (also rediss://, unix://)
    redis+cluster://[user:password@]host:port[,host:port...][/0]
    rediss+cluster://...                          the same over TLS

A cluster URL lists one or more seed nodes, comma-separated; the client asks any seed that
answers for the slot layout and follows MOVED/ASK and failovers from then on, so listing
more than one seed only matters while a seed is down at start-up. A cluster has only
database 0: a path other than empty or `/0` is an error. Query parameters are refused (none
is needed; a silently ignored one would be worse than an error).

The scheme rides in the URL, which already comes from a Secret (`idempotency.redisUrlSecretRef`,
`backpressure.redisUrlSecretRef`) or an env var (`AFC_IDEMPOTENCY__REDIS_URL`,
`AFC_BACKPRESSURE__REDIS_URL`, the producer's `AFC_PRODUCER__REDIS_URL`...), so neither the
settings nor the CRD need a field for it. (The idempotency store on a cluster:
docs/redis-cluster.md.)

Pool behaviour differs, and callers should know it:
- single Redis: with `max_connections`, a BlockingConnectionPool, a caller waits up to
  `pool_timeout` for a free connection; without, redis-py's default pool (grows as needed).
- cluster (asyncio and sync): redis-py keeps a pool per node of at most `max_connections`
  (asyncio default 100, sync unbounded) and raises `MaxConnectionsError` ("Too many
  connections") at once when it is exhausted: no blocking wait, `pool_timeout` does not
  apply, so size it for the most concurrent commands one process sends to one node.
- retries: a cluster client retries a command on connection errors, MOVED/ASK and
  TRYAGAIN, reloading the slot layout in between (that is how it gets through a failover);
  `retries` bounds that (redis-py's default is 10 with exponential back-off up to 10 s,
  too long for a signal that would rather fail fast and try again at its next beat).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}      # scheme -> TLS
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterTarget:
    """A parsed cluster URL."""
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False


def is_cluster_url(url: str) -> bool:
    return urlsplit(url.strip()).scheme.lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterTarget:
    """`redis+cluster://[user:pw@]h:p[,h:p...][/0]` -> ClusterTarget; ValueError says what is wrong
    (never echoing the password)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (scheme {scheme!r}; expected one of "
                         f"{', '.join(s + '://' for s in CLUSTER_SCHEMES)})")
    if parts.query or parts.fragment:
        raise ValueError("a Redis Cluster URL takes no query parameters or fragment")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0, the URL names {parts.path.lstrip('/')!r}")
    netloc = parts.netloc
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None            # as redis-py reads redis://user@h and redis://:pw@h
        password = unquote(pw) if sep and pw else None
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):                                 # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise ValueError(f"a seed node without a host: {item!r}")
        try:
            port = int(port_s) if port_s else DEFAULT_PORT
        except ValueError:
            raise ValueError(f"a seed node's port is not a number: {item!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"a seed node's port is out of range: {item!r}")
        nodes.append((host, port))
    if not nodes:
        raise ValueError("a Redis Cluster URL names no seed node")
    return ClusterTarget(tuple(nodes), username, password, CLUSTER_SCHEMES[scheme])


def _retry(retries: int | None, sync: bool) -> Any:
    if retries is None:
        return None
    from redis.backoff import ExponentialWithJitterBackoff
    if sync:
        from redis.retry import Retry
    else:
        from redis.asyncio.retry import Retry  # type: ignore[assignment]
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries)


def _common(socket_timeout: float | None, socket_connect_timeout: float | None) -> dict[str, Any]:
    return {k: v for k, v in (("socket_timeout", socket_timeout),
                              ("socket_connect_timeout", socket_connect_timeout)) if v is not None}


def _wait(pool_timeout: float | None) -> dict[str, Any]:
    """How long a caller waits for a free pooled connection (redis-py's default: 20 s)."""
    return {} if pool_timeout is None else {"timeout": pool_timeout}


def async_client(url: str, *, max_connections: int | None = None, pool_timeout: float | None = None,
                 socket_timeout: float | None = None, socket_connect_timeout: float | None = None,
                 retries: int | None = None, **extra: Any) -> Any:
    """A `redis.asyncio.Redis` or, for a cluster URL, a `redis.asyncio.RedisCluster`.

    `extra` goes to the client as it is (e.g. decode_responses). `retries` applies to a cluster
    only (a single Redis client does not retry, as before)."""
    return _client(url, False, max_connections, pool_timeout, socket_timeout, socket_connect_timeout, retries, extra)


def sync_client(url: str, *, max_connections: int | None = None, pool_timeout: float | None = None,
                socket_timeout: float | None = None, socket_connect_timeout: float | None = None,
                retries: int | None = None, **extra: Any) -> Any:
    """A `redis.Redis` or, for a cluster URL, a `redis.RedisCluster` (same options as async_client)."""
    return _client(url, True, max_connections, pool_timeout, socket_timeout, socket_connect_timeout, retries, extra)


def _client(url: str, sync: bool, max_connections: int | None, pool_timeout: float | None,
            socket_timeout: float | None, socket_connect_timeout: float | None, retries: int | None,
            extra: dict[str, Any]) -> Any:
    if sync:
        import redis as mod
        from redis import cluster as cmod
    else:
        import redis.asyncio as mod  # type: ignore[no-redef]
        from redis.asyncio import cluster as cmod  # type: ignore[no-redef]
    opts = {**_common(socket_timeout, socket_connect_timeout), **extra}
    if is_cluster_url(url):
        t = parse_cluster_url(url)
        if max_connections is not None:
            opts["max_connections"] = max_connections          # per node, and not blocking (module doc)
        retry = _retry(retries, sync)
        if retry is not None:
            opts["retry"] = retry
        return cmod.RedisCluster(startup_nodes=[cmod.ClusterNode(h, p) for h, p in t.nodes], username=t.username,
                                 password=t.password, ssl=t.ssl, **opts)
    if max_connections is not None:
        pool = mod.BlockingConnectionPool.from_url(url, max_connections=max_connections, **_wait(pool_timeout),
                                                   **opts)
        return mod.Redis(connection_pool=pool)
    return mod.Redis.from_url(url, **opts)


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a call on either kind of client raises when Redis is unreachable or refuses: catch
    this, not `redis.RedisError` alone. redis-py's `RedisClusterException` (no seed node
    answers, a slot not covered while a failover is under way) is not a RedisError."""
    from redis.exceptions import RedisClusterException, RedisError
    return (RedisError, RedisClusterException, OSError)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url.strip())
    if parts.password is None and "@" not in parts.netloc:
        return url
    hosts = parts.netloc.rpartition("@")[2]
    user = parts.username if parts.password is not None else None   # no password: the user part may be one
    return parts._replace(netloc=f"{user}:***@{hosts}" if user else f"***@{hosts}").geturl()
