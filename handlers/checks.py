"""The settings of a pipeline's steps, checked before a worker takes its first command.

A step whose settings are wrong (a value of the wrong type or out of range, a registry or
chart repository that is not configured at all, a declared secret the worker does not hold)
would otherwise fail only when a run reaches it, after earlier steps pushed tags and images.
`problems` names each problem on one line with the variable (or `with:` key) and the step,
for `cistate serve` (a worker refuses to start) and `cistate check` (says so without
starting anything).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from cistate.domain.pipeline import Step
from handlers.cd_settings import ALIASES, DeliverySettings
from handlers.masking import MIN_SECRET_LENGTH
from handlers.secrets import SecretSource
from handlers.settings import HandlerSettings


@dataclass(frozen=True)
class Needs:
    """What a handler reads from its settings, and which of them it cannot do without."""

    model: type[BaseSettings]
    required: tuple[str, ...] = ()
    aliases: Mapping[str, str] | None = None


NEEDS: dict[str, Needs] = {
    "setup": Needs(HandlerSettings, ("registry",)),
    "test": Needs(HandlerSettings),
    "build": Needs(HandlerSettings, ("registry",)),
    "tag-release": Needs(HandlerSettings),
    "img-release": Needs(HandlerSettings, ("registry",)),
    "deploy": Needs(DeliverySettings, aliases=ALIASES),
    "health": Needs(DeliverySettings, aliases=ALIASES),
    "helm-release": Needs(DeliverySettings, ("chart_repo",), ALIASES),
    "gitops": Needs(DeliverySettings, ("gitops_repo",), ALIASES),
    "qa-sync": Needs(DeliverySettings, ("argocd_url", "argocd_token"), ALIASES),
}


def problems(steps: Iterable[Step], secrets: SecretSource) -> list[str]:
    """One line per problem of the enabled `steps`, naming the steps it stops (a variable
    of the worker's environment that is wrong stops every step that reads it); empty when
    every one can run."""
    found: dict[str, list[str]] = {}  # problem -> the steps it stops, in pipeline order
    for step in steps:
        if not step.enabled:
            continue
        needs = NEEDS.get(step.uses)
        lines = _settings_problems(step, needs) if needs is not None else []
        for ref in step.secrets:
            try:
                if len(secrets.value(ref.name)) < MIN_SECRET_LENGTH:
                    lines.append(f"secret {ref.name} is shorter than {MIN_SECRET_LENGTH} "
                                 "characters, which is refused (masking it would blot out "
                                 "the log)")
            except LookupError as exc:
                lines.append(str(exc))
        for line in lines:
            found.setdefault(line, []).append(repr(step.name))
    return [f"{'steps' if len(names) > 1 else 'step'} {', '.join(names)}: {line}"
            for line, names in found.items()]


def _settings_problems(step: Step, needs: Needs) -> list[str]:
    given = {(needs.aliases or {}).get(key.replace("-", "_"), key.replace("-", "_")): value
             for key, value in step.with_.items()}
    known = {k: v for k, v in given.items() if k in needs.model.model_fields}
    try:
        settings = needs.model(**known)
    except ValidationError as exc:
        return [f"{_source(str(err['loc'][0]) if err['loc'] else '?', given)}: {err['msg']}"
                for err in exc.errors()]
    lines = []
    for name in needs.required:
        value = getattr(settings, name)
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if not text:
            lines.append(f"CISTATE_{name.upper()} is not set (nor `{name}:` in the step's "
                         "`with:`); this step cannot run without it")
    return lines


def _source(field: str, given: Mapping[str, object]) -> str:
    return f"`with: {field}`" if field in given else f"CISTATE_{field.upper()}"
