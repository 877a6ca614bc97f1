"""The operator's own settings: environment (`AFC_OPERATOR_` prefix) and command-line flags."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFC_OPERATOR_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces to serve (comma-separated in the environment).")
    all_namespaces: bool = Field(False, description="Serve every namespace (needs the cluster-wide RBAC).")
    field_manager: str = Field("afc-operator", min_length=1, description="Server-side apply field manager.")
    kafka_timeout_s: float = Field(3.0, gt=0, le=60, description="Bound of each Kafka admin request.")
    kafka_workers: int = Field(4, ge=1, le=64, description="Threads for Kafka probes.")
    api_timeout_s: float = Field(30.0, gt=0, description="Bound of each Kubernetes API request.")
    backoff_base_s: float = Field(1.0, gt=0, description="First retry delay after a failed reconcile.")
    backoff_max_s: float = Field(120.0, gt=0, description="Longest retry delay.")
    liveness_endpoint: str | None = Field("http://0.0.0.0:8081/healthz", description="kopf's liveness probe URL.")
    metrics_endpoint: str | None = Field("0.0.0.0:8082", pattern=r"^[^:]*:[0-9]{1,5}$",
                                         description="host:port serving /metrics; None disables.")
    kafka_client_idle_s: float = Field(900.0, gt=0, description="Close a cluster's Kafka admin client unused this long.")
    peering: str | None = Field(None, min_length=1, description=(
        "Name of the KopfPeering (namespaced) or ClusterKopfPeering (--all-namespaces) object the "
        "replicas of the operator share: the one with the highest priority works, the others wait. "
        "None: standalone (one replica only)."))
    priority: int | None = Field(None, description=(
        "Peering priority; None: from the start time, so the replica that started first keeps "
        "working and a restarted one waits (no hand-back)."))
    peering_lifetime_s: int = Field(15, ge=5, le=300, description=(
        "How long a replica's keep-alive counts: a replica that stops renewing it (killed) is "
        "replaced within this long. Keep-alives are sent every lifetime minus 5-10 s (at least 1 s)."))
    log_format: Literal["json", "plain"] = "json"
    verbose: bool = False

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    @model_validator(mode="after")
    def _scope(self) -> "OperatorSettings":
        if self.all_namespaces and self.namespaces:
            raise ValueError("set either namespaces or all_namespaces, not both")
        if not self.all_namespaces and not self.namespaces:
            raise ValueError("no namespace to serve: set AFC_OPERATOR_NAMESPACES (or --namespace) "
                             "or AFC_OPERATOR_ALL_NAMESPACES=true (or --all-namespaces)")
        return self
