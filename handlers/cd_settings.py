"""Settings of the delivery handlers (deploy, health, helm-release, gitops, qa-sync).

As in `handlers.settings`: a value comes from the step's `with:` when given there, else from
the worker's environment (`CISTATE_<NAME>`), else from the default below; `with:` keys may be
spelled with `-` or `_`. Credentials (chart repo, GitOps, Argo CD) come from the environment
only: a `with:` block is pipeline data that ends up in events, so a credential there is
refused. So does `deploy_allow_cluster_kinds`: a pipeline may come from the pushed repo, and
what a deploy may do to the whole cluster is the worker's decision, not the repo's.

`dev_namespace` may be a template naming the run's `${branch}`, `${app}` and `${short_sha}`
(`dev-${branch}`: one namespace per branch); `namespace_for` renders it (see
`render_namespace` for how a branch becomes a valid, unique namespace name).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from handlers import git
from handlers.base import StepFailed, StepRequest
from handlers.settings import overridden

SECRET_KEYS = frozenset({"chart_repo_username", "chart_repo_password", "argocd_token"})
# settings that widen what a step may do: the worker's environment alone sets them
ENVIRONMENT_ONLY = frozenset({"deploy_allow_cluster_kinds"})
# `with:` names that read better in a pipeline than the setting they stand for
ALIASES = {"url": "health_url", "namespace": "dev_namespace", "application": "argocd_app"}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_KIND = re.compile(r"[A-Z][A-Za-z0-9]*")

# the run's values a namespace template may name, as ${name}
NAMESPACE_VARIABLES = ("branch", "app", "short_sha")
MAX_NAMESPACE = 63  # an RFC 1123 label
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_TEMPLATE_TEXT = re.compile(r"[a-z0-9-]*")
_PLAIN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")  # a value used in a name as it is
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_HASH = 8  # hex digits of the suffix that keeps a changed or cut name unique
_LOOKS_HASHED = re.compile(rf"(\A|-)[0-9a-f]{{{_HASH}}}\Z")


def namespace_template_problem(template: str) -> str | None:
    """What is wrong with a `dev_namespace` (a name, or a template), or None."""
    names = _VARIABLE.findall(template)
    unknown = [name for name in names if name not in NAMESPACE_VARIABLES]
    known = ", ".join(f"${{{name}}}" for name in NAMESPACE_VARIABLES)
    if unknown:
        return (f"{template!r} names ${{{unknown[0]}}}, which is not a variable of a namespace "
                f"template ({known})")
    if not names and "$" not in template:
        if _DNS_LABEL.fullmatch(template):
            return None
        return (f"{template!r} is not a Kubernetes namespace name (an RFC 1123 label: a-z, 0-9 "
                f"and -, starting and ending with a letter or digit, at most {MAX_NAMESPACE} "
                f"characters) nor a template naming {known}")
    if not _TEMPLATE_TEXT.fullmatch(_VARIABLE.sub("", template)):
        return (f"{template!r} is not a namespace template: outside ${{...}} it may hold only "
                f"a-z, 0-9 and - (the variables {known} are made DNS-safe when rendered)")
    return None


def render_namespace(template: str, values: Mapping[str, str]) -> str:
    """The namespace `template` names for `values` (by variable name): always an RFC 1123
    label of at most 63 characters, and a different one for different values.

    A value that already is a DNS-safe name (`main`, `release-1-2`) is used as it is. Any
    other is made safe (lower-case, each run of other characters one `-`, none at the ends:
    `feature/Login_Page` -> `feature-login-page`) and, since that is no longer the value
    alone (`feature-login-page` reads the same), the name gets a suffix: `-` and 8 hex digits
    of a SHA-256 of the template and the values as given. So does a name longer than 63
    characters, cut to make room, and one that ends like such a suffix, so that no branch
    can be given another branch's namespace. The same values give the same name every time.
    """
    parts = _VARIABLE.split(template)  # text, variable, text, variable, ..., text
    if len(parts) == 1:
        return template
    exact = True
    pieces = []
    used = {}
    for index, part in enumerate(parts):
        if index % 2 == 0:
            pieces.append(part)
            continue
        value = values[part]
        used[part] = value
        exact = exact and bool(_PLAIN.fullmatch(value))
        pieces.append(_NOT_ALNUM.sub("-", value.lower()).strip("-"))
    name = "".join(pieces).strip("-")
    if exact and name and len(name) <= MAX_NAMESPACE and not _LOOKS_HASHED.search(name):
        return name
    identity = json.dumps([template, sorted(used.items())], ensure_ascii=False)
    digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH]
    head = name[: MAX_NAMESPACE - _HASH - 1].rstrip("-")
    return f"{head}-{digest}" if head else digest


class DeliverySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="forbid",
                                      use_attribute_docstrings=True)

    # cluster access: a kubeconfig file, else the in-cluster service account
    kubeconfig: Path | None = None
    """The kubeconfig file of the dev cluster; empty: the in-cluster service account"""
    kube_context: str = ""
    """The kubeconfig's context; empty: its current one"""
    # the helm executable: a path, or a name on PATH
    helm: str = "helm"
    """The helm executable: a path, or a name on PATH"""

    # deploy
    dev_namespace: str = "dev"  # a name, or a template: dev-${branch} (see namespace_for)
    """The namespace deploy applies into: a name or a template such as `dev-${branch}`"""
    chart_dir: str = "chart"  # the directory in the repo that holds the one chart
    """The folder of the repo that holds its one chart"""
    ingress_subdomain: str = ""
    """The cluster's Ingress subdomain, given to the chart as `ingress.subdomain`"""
    ingress_tls_secret: str = ""
    """The TLS secret of the app's Ingress; empty: plain http"""
    rollout_timeout: float = Field(default=300.0, gt=0)
    """Seconds deploy waits for the rollout"""
    rollout_interval: float = Field(default=1.0, gt=0)
    """Seconds between two looks at the rollout, when the deploy credentials may not watch it"""
    rollout_watch_seconds: int = Field(default=300, ge=1)
    """Seconds one watch on a rollout lasts before deploy reads the object again and renews it"""
    # cluster-scoped kinds (ClusterRole, CustomResourceDefinition, ...) a chart may apply;
    # by default none: deploy applies only namespaced objects, into dev_namespace
    deploy_allow_cluster_kinds: Annotated[frozenset[str], NoDecode] = frozenset()
    """Cluster-scoped kinds a chart may apply, comma-separated (environment only); none by default
    """

    # health
    health_url: str = ""  # the app's base URL; empty = http://<the app's Ingress host>
    """The app's base URL; empty: http://<the app's Ingress host>"""
    health_path: str = "/health"
    """The path health asks for (must start with /)"""
    health_protocol: Literal["http", "https"] = "http"
    """http or https, with the Ingress host"""
    health_port: int | None = Field(default=None, ge=1, le=65535)  # the ingress' port
    """The Ingress' port; empty: the protocol's"""
    health_attempts: int = Field(default=15, ge=1, le=1000)
    """How often health asks before it fails"""
    health_backoff: float = Field(default=0.1, ge=0)
    """Seconds before health asks again (doubling after)"""
    health_backoff_max: float = Field(default=10.0, ge=0)
    """The longest wait between two asks of health, in seconds"""
    health_timeout: float = Field(default=5.0, gt=0)  # per request
    """Seconds one health request may take"""

    # helm-release: oci://host[:port]/path or http(s)://host/path (an HTTP chart repo)
    chart_repo: str = ""
    """Where helm-release publishes: oci://host[:port]/path or an http(s):// chart repository
    (required by helm-release)
    """
    chart_repo_insecure: bool = False  # plain http to an OCI registry
    """Plain http to an OCI chart registry"""
    chart_repo_username: str = ""
    """Chart repository user (environment only)"""
    chart_repo_password: SecretStr = SecretStr("")
    """Chart repository password (environment only)"""
    chart_repo_attempts: int = Field(default=10, ge=1, le=100)
    """Tries of the chart repository client (and of index.yaml updates that race)"""
    chart_repo_timeout: float = Field(default=60.0, gt=0)
    """Seconds one chart repository request may take"""

    # gitops
    gitops_repo: str = ""
    """The GitOps repo's clone URL (required by gitops)"""
    gitops_branch: str = "qa"
    """The GitOps branch QA is synced from"""
    gitops_dir: str = "qa"  # parent directory of <app>/ in the GitOps repo
    """The folder of the GitOps repo that holds `<app>/`"""
    gitops_yaml: str = "requirements.yaml"
    """The file of `<app>/` that names the chart version"""
    gitops_attempts: int = Field(default=5, ge=1, le=50)
    """Tries of gitops when the branch moves under it"""
    git_user_name: str = "cistate"
    """Author name of the GitOps commits"""
    git_user_email: str = "cistate@localhost"
    """Author email of the GitOps commits"""

    # qa-sync
    argocd_url: str = ""
    """Argo CD's URL (required by qa-sync)"""
    argocd_token: SecretStr = SecretStr("")
    """Argo CD's API token (environment only; required by qa-sync)"""
    argocd_app: str = ""  # empty = the app name
    """The Argo CD Application of QA; empty: the app's name"""
    argocd_insecure: bool = False  # skip TLS verification
    """Skip TLS verification of Argo CD"""
    argocd_timeout: float = Field(default=600.0, gt=0)
    """Seconds qa-sync waits for Synced and Healthy"""
    argocd_interval: float = Field(default=5.0, gt=0)
    """Seconds between two looks at the Application"""

    @field_validator("dev_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        problem = namespace_template_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def namespace_for(self, request: StepRequest) -> str:
        """`dev_namespace` rendered for the run: `${branch}` is setup's branch (else the
        pushed ref's), `${app}` setup's app name, `${short_sha}` setup's short sha (else the
        commit's first 7 characters)."""
        setup = request.outputs_from("setup")
        names = set(_VARIABLE.findall(self.dev_namespace))
        values = {}
        if "branch" in names:
            values["branch"] = str(setup.get("branch") or git.branch_of(request.ref))
        if "app" in names:
            values["app"] = str(request.output_of("setup", "app_name"))
        if "short_sha" in names:
            values["short_sha"] = str(setup.get("short_sha") or request.commit[:7])
        return render_namespace(self.dev_namespace, values)

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
