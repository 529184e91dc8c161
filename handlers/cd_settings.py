"""Settings of the delivery handlers (deploy, health, helm-release, gitops, qa-sync).

As in `handlers.settings`: a value comes from the step's `with:` when given there, else from
the worker's environment (`CISTATE_<NAME>`), else from the default below; `with:` keys may be
spelled with `-` or `_`. Credentials (chart repo, GitOps, Argo CD) come from the environment
only: a `with:` block is pipeline data that ends up in events, so a credential there is
refused. So does `deploy_allow_cluster_kinds`: a pipeline may come from the pushed repo, and
what a deploy may do to the whole cluster is the worker's decision, not the repo's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from handlers.base import StepFailed, StepRequest
from handlers.settings import overridden

SECRET_KEYS = frozenset({"chart_repo_username", "chart_repo_password", "argocd_token"})
# settings that widen what a step may do: the worker's environment alone sets them
ENVIRONMENT_ONLY = frozenset({"deploy_allow_cluster_kinds"})
# `with:` names that read better in a pipeline than the setting they stand for
ALIASES = {"url": "health_url", "namespace": "dev_namespace", "application": "argocd_app"}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_KIND = re.compile(r"[A-Z][A-Za-z0-9]*")


class DeliverySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="forbid")

    # cluster access: a kubeconfig file, else the in-cluster service account
    kubeconfig: Path | None = None
    kube_context: str = ""
    # the helm executable: a path, or a name on PATH
    helm: str = "helm"

    # deploy
    dev_namespace: str = "dev"
    chart_dir: str = "chart"  # the directory in the repo that holds the one chart
    ingress_subdomain: str = ""
    ingress_tls_secret: str = ""
    rollout_timeout: float = Field(default=300.0, gt=0)
    rollout_interval: float = Field(default=1.0, gt=0)
    # cluster-scoped kinds (ClusterRole, CustomResourceDefinition, ...) a chart may apply;
    # by default none: deploy applies only namespaced objects, into dev_namespace
    deploy_allow_cluster_kinds: Annotated[frozenset[str], NoDecode] = frozenset()

    # health
    health_url: str = ""  # the app's base URL; empty = http://<the app's Ingress host>
    health_path: str = "/health"
    health_protocol: Literal["http", "https"] = "http"
    health_port: int | None = Field(default=None, ge=1, le=65535)  # the ingress' port
    health_attempts: int = Field(default=10, ge=1, le=1000)
    health_backoff: float = Field(default=1.0, ge=0)
    health_backoff_max: float = Field(default=15.0, ge=0)
    health_timeout: float = Field(default=5.0, gt=0)  # per request

    # helm-release: oci://host[:port]/path or http(s)://host/path (an HTTP chart repo)
    chart_repo: str = ""
    chart_repo_insecure: bool = False  # plain http to an OCI registry
    chart_repo_username: str = ""
    chart_repo_password: SecretStr = SecretStr("")
    chart_repo_attempts: int = Field(default=10, ge=1, le=100)
    chart_repo_timeout: float = Field(default=60.0, gt=0)

    # gitops
    gitops_repo: str = ""
    gitops_branch: str = "qa"
    gitops_dir: str = "qa"  # parent directory of <app>/ in the GitOps repo
    gitops_yaml: str = "requirements.yaml"
    gitops_attempts: int = Field(default=5, ge=1, le=50)
    git_user_name: str = "cistate"
    git_user_email: str = "cistate@localhost"

    # qa-sync
    argocd_url: str = ""
    argocd_token: SecretStr = SecretStr("")
    argocd_app: str = ""  # empty = the app name
    argocd_insecure: bool = False  # skip TLS verification
    argocd_timeout: float = Field(default=600.0, gt=0)
    argocd_interval: float = Field(default=5.0, gt=0)

    @field_validator("dev_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"{value!r} is not a Kubernetes namespace name (an RFC 1123 label)")
        return value

    @field_validator("deploy_allow_cluster_kinds", mode="before")
    @classmethod
    def _split_kinds(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("deploy_allow_cluster_kinds")
    @classmethod
    def _kinds(cls, value: frozenset[str]) -> frozenset[str]:
        odd = sorted(kind for kind in value if not _KIND.fullmatch(kind))
        if odd:
            raise ValueError(
                f"{', '.join(map(repr, odd))} are not Kubernetes kinds; list kinds as the API "
                "spells them, comma-separated (ClusterRole,CustomResourceDefinition)"
            )
        return value

    @field_validator("chart_dir", "gitops_dir")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{value!r} must be a path inside the repo, without '..'")
        return value

    @field_validator("chart_repo", "argocd_url", "health_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip().rstrip("/")

    @field_validator("health_url")
    @classmethod
    def _app_url(cls, value: str) -> str:
        if value and (URL(value).scheme not in ("http", "https") or not URL(value).host):
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        return value

    @field_validator("health_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must be a path on the app's host, starting with /")
        return value


def for_request(request: StepRequest) -> DeliverySettings:
    """The environment's settings overridden by the step's `with:`."""
    widening = sorted(ENVIRONMENT_ONLY & {key.replace("-", "_") for key in request.settings})
    if widening:
        raise StepFailed(
            f"step {request.step!r} sets {', '.join(widening)} in `with:`; it widens what the "
            "step may do to the cluster, and a pipeline may come from the pushed repo, so only "
            f"the worker's environment sets it "
            f"({', '.join('CISTATE_' + key.upper() for key in widening)})",
            retryable=False,
        )
    return overridden(request, DeliverySettings, SECRET_KEYS, ALIASES)
