"""`afc-operator`: run the AdaptiveConsumer operator.

    afc-operator --namespace team-a [--namespace team-b]   # namespaced (Role per namespace)
    afc-operator --all-namespaces                          # cluster-wide (ClusterRole)
    afc-operator ... --peering afc-operator                # 2+ replicas: one works, the others wait

Every flag has an environment twin (`AFC_OPERATOR_NAMESPACES=a,b`, `AFC_OPERATOR_ALL_NAMESPACES`,
...); flags win. Logs are JSON lines on stderr unless `--log-format plain`.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
import time
from typing import Any, Sequence

import kopf
from kubernetes.config.config_exception import ConfigException
from pydantic import ValidationError

from afc.operator.kafka import KafkaProbe
from afc.operator.kube import Kube
from afc.operator.metrics import OperatorMetrics
from afc.operator.reconcile import Reconciler, register, watchable
from afc.operator.settings import OperatorSettings

logger = logging.getLogger("afc.operator")


class QuietChildEvents(logging.Filter):
    """kopf logs every watch-event handler's success at INFO; for child objects that is one
    line per StatefulSet status change. Keep their failures, drop the successes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (record.levelno <= logging.INFO and msg.startswith("Handler 'child-") and msg.endswith("succeeded."))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="afc-operator", description="Reconcile AdaptiveConsumer resources.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="serve this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", default=None,
                       help="serve every namespace")
    p.add_argument("--liveness", dest="liveness_endpoint", metavar="URL",
                   help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz; 'none' disables")
    p.add_argument("--metrics", dest="metrics_endpoint", metavar="HOST:PORT",
                   help="serve the operator's /metrics here, e.g. 0.0.0.0:8082; 'none' disables")
    p.add_argument("--peering", metavar="NAME",
                   help="run with other replicas: the KopfPeering (ClusterKopfPeering with --all-namespaces) "
                        "object they share; only the one with the highest priority works")
    p.add_argument("--priority", type=int, help="peering priority (default: the elder replica wins)")
    p.add_argument("--log-format", choices=["json", "plain"])
    p.add_argument("-v", "--verbose", action="store_true", default=None)
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> OperatorSettings:
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    if overrides.get("namespaces"):
        overrides["all_namespaces"] = False
    elif overrides.get("all_namespaces"):
        overrides["namespaces"] = []
    for endpoint in ("liveness_endpoint", "metrics_endpoint"):
        if overrides.get(endpoint) == "none":
            overrides[endpoint] = None
    return OperatorSettings(**overrides)


def start_priority(now_ns: int | None = None) -> int:
    """A peering priority that falls with the start time (microseconds): the replica that started
    first works, one started later waits, and a replaced replica never takes the work back from
    the one that took over (no second hand-over). Two replicas with the same priority would both
    pause (kopf's rule), which needs two starts in the same microsecond."""
    return (2**53 - 1) - (time.time_ns() if now_ns is None else now_ns) // 1000


def main(argv: Sequence[str] | None = None) -> int:
    try:
        faulthandler.enable()  # a crash in native code (librdkafka) still says where Python was
    except (ValueError, OSError):   # stderr without a file descriptor (embedded, captured)
        pass
    args = parse_args(argv)
    try:
        cfg = load_settings(args)
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        print(f"afc-operator: {msgs}", file=sys.stderr)  # before logging is set up
        return 2
    kopf.configure(verbose=cfg.verbose, log_format=kopf.LogFormat.JSON if cfg.log_format == "json"
                   else kopf.LogFormat.FULL)
    # aiohttp.access: one line per probe; kafka: kafka-python's info line per coordinator lookup
    for noisy in ("kubernetes", "urllib3", "aiohttp.access", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietChildEvents())
    metrics = OperatorMetrics()
    try:
        kube = Kube(timeout_s=cfg.api_timeout_s, on_request=metrics.api_request)
    except ConfigException as e:
        logger.error("no Kubernetes credentials: not in a pod and no usable kubeconfig", extra={"error": str(e)})
        return 2
    registry = kopf.OperatorRegistry()
    if cfg.metrics_endpoint:
        metrics.serve(cfg.metrics_endpoint)
    reconciler = Reconciler(kube, KafkaProbe(cfg.kafka_timeout_s, cfg.kafka_workers, cfg.kafka_client_idle_s), cfg,
                            metrics)
    register(registry, reconciler, cfg, cached=watchable(kube, cfg))
    priority = cfg.priority if cfg.priority is not None else start_priority()
    logger.info("starting", extra={"namespaces": cfg.namespaces or "*", "all_namespaces": cfg.all_namespaces,
                                   "peering": cfg.peering, "priority": priority if cfg.peering else None})
    # With a peering name kopf makes peering mandatory: no peering object, no work (never two
    # replicas working because the object was missing).
    kopf.run(registry=registry, standalone=cfg.peering is None, peering_name=cfg.peering,
             priority=priority if cfg.peering else 0, clusterwide=cfg.all_namespaces,
             namespaces=cfg.namespaces, liveness_endpoint=cfg.liveness_endpoint, memo=kopf.Memo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
