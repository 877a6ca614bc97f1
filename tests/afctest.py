"""Helpers for tests that use the real test bed (imported by conftest and by tests)."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass(frozen=True)
class Testbed:
    __test__ = False  # not a test class, despite the name
    bootstrap: str
    redis_url: str
    kubeconfig: str
    kubectl: str
    k8s_bin: str
    state_dir: str
    redis_cluster_url: str      # redis+cluster://<every node>/0 (afc.runtime.redisconn's scheme)

    @classmethod
    def load(cls) -> "Testbed":
        """From the environment `make test` exports, else by starting the bed (idempotent)."""
        names = ("AFC_KAFKA_BOOTSTRAP", "AFC_REDIS_URL", "KUBECONFIG", "AFC_KUBECTL", "AFC_K8S_BIN",
                 "AFC_TESTBED_DIR", "AFC_REDIS_CLUSTER_URL")
        env = {k: os.environ[k] for k in names if k in os.environ}
        if len(env) < len(names):
            r = subprocess.run(["python3", str(ROOT / "scripts" / "testbed.py"), "up"],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"test bed did not start:\n{r.stderr}")
            env = json.loads(Path(os.environ.get("AFC_TESTBED_DIR", ROOT / ".testbed"), "env.json").read_text())
        return cls(bootstrap=env["AFC_KAFKA_BOOTSTRAP"], redis_url=env["AFC_REDIS_URL"],
                   kubeconfig=env["KUBECONFIG"], kubectl=env["AFC_KUBECTL"],
                   k8s_bin=env["AFC_K8S_BIN"], state_dir=env["AFC_TESTBED_DIR"],
                   redis_cluster_url=env["AFC_REDIS_CLUSTER_URL"])

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each CRD is Established. Not `kubectl wait --for=condition=Established`:
        right after the create its status has no conditions yet, and kubectl then fails at
        once (".status.conditions accessor error: <nil>") instead of waiting; a clean-clone
        run lost every operator test to that."""
        for crd in crds:
            wait_for(lambda crd=crd: self.run_kubectl(
                "get", "crd", crd, "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}',
                check=False).stdout.strip() == "True", timeout, 0.5, what=f"crd/{crd} Established")

    def run_kubectl(self, *args: str, input: str | None = None, check: bool = True,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([self.kubectl, f"--kubeconfig={self.kubeconfig}", *args], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r


def wait_for(fn: Callable[[], T], timeout: float = 30, interval: float = 0.2, what: str = "condition") -> T:
    """Poll until fn() is truthy; bounded, and says what it waited for when it gives up."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConsumerProcess:
    """`afc-consumer run` as a real subprocess, with its log in a file and a metrics port."""

    def __init__(self, testbed: Testbed, topics: list[str], group: str, handler: str | None, log_path: Path,
                 instance_id: str | None = None, env: dict[str, str] | None = None,
                 redis_prefix: str = "afc") -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "tests"),
            "AFC_KAFKA__BOOTSTRAP_SERVERS": testbed.bootstrap,
            "AFC_KAFKA__TOPICS": json.dumps(topics),
            "AFC_KAFKA__GROUP_ID": group,
            "AFC_IDEMPOTENCY__REDIS_URL": testbed.redis_url,
            "AFC_IDEMPOTENCY__KEY_PREFIX": redis_prefix.rstrip(":"),
            "AFC_SERVER__HOST": "127.0.0.1",
            "AFC_SERVER__PORT": str(self.port),
            "AFC_TEST_REDIS_URL": testbed.redis_url,
            **({"AFC_INSTANCE_ID": instance_id} if instance_id else {"AFC_MEMBERSHIP__STATIC": "false"}),
            **(env or {}),
        }
        self.handler = handler
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ConsumerProcess":
        exe = str(ROOT / ".venv" / "bin" / "afc-consumer")
        self._log = open(self.log_path, "ab")
        args = ["--handler", self.handler] if self.handler else []
        self.proc = subprocess.Popen([exe, "run", *args], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def http(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {'name{labels}': value} (histogram buckets included)."""
        code, text = self.http("/metrics")
        out: dict[str, float] = {}
        if code != 200:
            return out
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.http("/readyz")[0] == 200 or self._died(), timeout, what="consumer /readyz")
        if self._died():
            raise AssertionError(f"consumer exited {self.proc.returncode}:\n{self.log_tail()}")

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the drain; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"consumer did not stop within {timeout}s:\n{self.log_tail()}")
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def group_lag(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(committed total, lag total) of a group on a topic, read from the broker."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        committed = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        total = lag = 0
        for tp in committed:
            _, high = c.get_watermark_offsets(tp, timeout=10)
            done = max(tp.offset, 0)
            total += done
            lag += high - done
        return total, lag
    finally:
        c.close()


def produce_json(bootstrap: str, topic: str, docs: list[dict], key_of=None, headers_of=None,
                 partition_of=None) -> None:
    import orjson
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for i, d in enumerate(docs):
        kw = {}
        if partition_of is not None:
            kw["partition"] = partition_of(i, d)
        while True:
            try:
                p.produce(topic, value=orjson.dumps(d), key=key_of(i, d) if key_of else None,
                          headers=headers_of(i, d) if headers_of else None, **kw)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0


def read_topic(bootstrap: str, topic: str, until: Callable[[list], bool] = lambda msgs: bool(msgs),
               timeout: float = 30) -> list:
    """Records of a topic from its start (no group, nothing committed) until `until(records)`
    holds or `timeout` passes; each record as confluent_kafka's Message. Waits for the topic."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "afctest-reader", "enable.auto.commit": False,
                  "enable.partition.eof": False})
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            md = c.list_topics(topic, timeout=10).topics.get(topic)
            if md is not None and md.error is None and md.partitions:
                c.assign([TopicPartition(topic, p, 0) for p in md.partitions])   # offset 0: from the start
                break
            time.sleep(0.5)
        else:
            return out
        while time.monotonic() < deadline and not until(out):
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                out.append(m)
        return out
    finally:
        c.close()


def produce_one(producer, topic: str, doc: dict, partition: int | None = None, key: bytes | None = None,
                headers: list | None = None) -> None:
    """One JSON record through an open confluent Producer, sent now (poll, no linger wait)."""
    import orjson
    kw = {"partition": partition} if partition is not None else {}
    producer.produce(topic, value=orjson.dumps(doc), key=key, headers=headers, **kw)
    producer.poll(0)


class PrivateRedis:
    """A redis-server of the test's own on a free port (append-only file in `data`, so a
    restart keeps its keys), for faults the shared test bed's Redis must not suffer:
    stop/start, OOM (maxmemory), READONLY (replicaof), eviction policies."""

    def __init__(self, data: Path, *args: str) -> None:
        self.port = free_port()
        self.data, self.args = data, args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        import socket
        self.data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                                      "--dir", str(self.data), "--save", "", "--appendonly", "yes",
                                      "--appendfsync", "always", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", self.port)) == 0, 10, 0.05, what="private redis")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):
        import redis
        return redis.Redis.from_url(self.url, socket_timeout=5)


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """partition -> the group's committed offset (0 where none), read from the broker."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {tp.partition: max(tp.offset, 0)
                for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10)}
    finally:
        c.close()


class Load:
    """Keeps every partition of a topic busy (a few messages a second each) until stopped."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, per_second: float = 10) -> None:
        self.bootstrap, self.topic, self.partitions, self.per_second = bootstrap, topic, partitions, per_second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        from confluent_kafka import Producer
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        n = 0
        while not self._stop.wait(1 / self.per_second):
            for part in range(self.partitions):
                p.produce(self.topic, value=json.dumps({"n": n}).encode(), partition=part)
            n += 1
            p.poll(0)
        p.flush(10)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
