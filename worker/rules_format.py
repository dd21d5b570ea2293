"""The provisioning rules file: YAML or TOML parsed and validated into immutable ``Rule`` objects.

Format (YAML shown; TOML is the same data, ``[[rules]]`` tables)::

    rules:
      - name: acme-admins            # unique; recorded in commands as requested_by "rule:<name>"
        mode: on_join                # on_join: once per membership generation; enforce: restore drift
        role: org:admin              # the role the matched member must hold
        dry_run: false               # optional: plan and record commands, never send them
        when:                        # optional; every condition given must hold (AND)
          organization: {id: org_1, slug: acme, metadata: {plan: enterprise}}
          user: {id: user_1, email_domain: acme.test, identifier: "*@acme.test",
                 identifier_regex: '^[a-z]+@acme\\.test$'}
          membership: {metadata: {team: ops}, private_metadata: {...}}
          invitation: {metadata: {...}, private_metadata: {...}}
          role: org:member           # the member's current role
          event: member_joined       # member_joined | invitation_accepted | role_changed

Every scalar condition also takes a list, meaning "any of". Text comparisons (slugs, email
domains, identifiers, regexes) ignore case; ids and role keys are exact. ``email_domain`` is
the part of the identifier after the last ``@``; ``*.acme.test`` matches the subdomains of
acme.test (list ``acme.test`` as well for the domain itself).
``identifier`` is a shell-style glob (``*``, ``?``, ``[...]``) on the whole identifier,
``identifier_regex`` a Python regular expression that must match the whole identifier.
Metadata conditions map keys (dotted for nested objects: ``billing.tier``) to the value
required, or to a list of accepted values.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.errors import ConfigError, PermanentError

ON_JOIN = "on_join"
ENFORCE = "enforce"
MODES = (ON_JOIN, ENFORCE)

MEMBER_JOINED = "member_joined"
INVITATION_ACCEPTED = "invitation_accepted"
ROLE_CHANGED = "role_changed"
EVENTS = (MEMBER_JOINED, INVITATION_ACCEPTED, ROLE_CHANGED)

# rule_states.rule_name is String(128); requested_by adds the "rule:" prefix to it.
MAX_NAME = 128
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
YAML_SUFFIXES = (".yaml", ".yml")
TOML_SUFFIXES = (".toml",)

Scalar = str | int | float | bool | None


class RulesError(ConfigError):
    """A rules file that cannot be used; the message names the file, the rule and the field."""


@dataclass(frozen=True)
class MetadataCondition:
    """``path`` (dotted keys into a JSON object) must hold one of ``accepted``."""

    path: tuple[str, ...]
    accepted: tuple[Scalar, ...]

    def matches(self, metadata: Mapping[str, Any] | None) -> bool:
        value: Any = metadata or {}
        for key in self.path:
            if not isinstance(value, Mapping) or key not in value:
                return False
            value = value[key]
        # Strict on bool: JSON true is not the number 1, though Python says True == 1.
        return any(type(value) is type(wanted) and value == wanted for wanted in self.accepted) or any(
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and isinstance(wanted, int | float)
            and not isinstance(wanted, bool)
            and value == wanted
            for wanted in self.accepted
        )


@dataclass(frozen=True)
class Conditions:
    """What a membership must look like for a rule to match; empty tuples mean "any"."""

    organization_ids: tuple[str, ...] = ()
    organization_slugs: tuple[str, ...] = ()
    organization_metadata: tuple[MetadataCondition, ...] = ()
    organization_private_metadata: tuple[MetadataCondition, ...] = ()
    user_ids: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    identifier_globs: tuple[str, ...] = ()
    identifier_regexes: tuple[re.Pattern[str], ...] = ()
    membership_metadata: tuple[MetadataCondition, ...] = ()
    membership_private_metadata: tuple[MetadataCondition, ...] = ()
    invitation_metadata: tuple[MetadataCondition, ...] = ()
    invitation_private_metadata: tuple[MetadataCondition, ...] = ()
    roles: tuple[str, ...] = ()
    events: tuple[str, ...] = ()

    @property
    def needs_invitation(self) -> bool:
        return bool(self.invitation_metadata or self.invitation_private_metadata)


@dataclass(frozen=True)
class Rule:
    index: int
    name: str
    mode: str
    role: str
    dry_run: bool = False
    when: Conditions = field(default_factory=Conditions)

    @property
    def requested_by(self) -> str:
        return f"rule:{self.name}"

    def describe(self) -> str:
        return f"rule {self.index} ({self.name!r})"


@dataclass(frozen=True)
class RuleSet:
    """The ordered rules of one file: the first rule whose conditions match a membership decides."""

    path: Path | None
    rules: tuple[Rule, ...]

    @property
    def roles(self) -> set[str]:
        return {rule.role for rule in self.rules}

    def check_roles(self, known_roles: Iterable[str] | None) -> None:
        """Raise ``RulesError`` for role keys the mirror does not know; ``None`` skips the check."""
        if known_roles is None:
            return
        known = set(known_roles)
        errors = []
        for rule in self.rules:
            if rule.role not in known:
                errors.append(f"{_where(self.path, rule)}: field role: unknown role {rule.role!r}")
            for role in rule.when.roles:
                if role not in known:
                    errors.append(f"{_where(self.path, rule)}: field when.role: unknown role {role!r}")
        if errors:
            listed = ", ".join(sorted(known)) or "none"
            raise RulesError("; ".join(errors) + f" (roles in the mirror: {listed})")


def _where(path: Path | None, rule: Rule | None = None, index: int | None = None, name: Any = None) -> str:
    place = str(path) if path is not None else "<rules>"
    if rule is not None:
        return f"{place}: {rule.describe()}"
    if index is not None:
        return f"{place}: rule {index}" + (f" ({name!r})" if isinstance(name, str) and name else "")
    return place


def load_rules(path: Path | str, *, known_roles: Iterable[str] | None = None) -> RuleSet:
    """Read and validate a rules file (format by extension: .yaml, .yml or .toml).

    Raises ``RulesError`` naming the file, the rule (1-based index and name) and the field.
    ``known_roles`` (the mirrored role keys) also checks every role key; ``None`` skips that.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in YAML_SUFFIXES + TOML_SUFFIXES:
        raise RulesError(
            f"{path}: unknown rules file format {suffix or '(no extension)'!r}: use .yaml, .yml or .toml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"{path}: rules file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot read the rules file: {type(exc).__name__}: {exc}") from None
    ruleset = parse_rules(text, path=path, fmt="toml" if suffix in TOML_SUFFIXES else "yaml")
    ruleset.check_roles(known_roles)
    return ruleset


def parse_rules(text: str, *, path: Path | None = None, fmt: str = "yaml") -> RuleSet:
    """Validate the text of a rules file; ``path`` only names it in errors."""
    if fmt == "toml":
        try:
            document: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{_where(path)}: not valid TOML: {exc}") from None
    else:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise RulesError(f"{_where(path)}: not valid YAML{where}: {problem}") from None
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise RulesError(f"{_where(path)}: the top level must be a mapping with a 'rules' list")
    unknown = sorted(set(document) - {"rules"})
    if unknown:
        raise RulesError(f"{_where(path)}: unknown top-level field(s) {', '.join(map(repr, unknown))}")
    raw_rules = document.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RulesError(f"{_where(path)}: field rules: must be a list of rules")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_rules, start=1):
        rule = _parse_rule(raw, path=path, index=index)
        if rule.name in seen:
            raise RulesError(
                f"{_where(path, rule)}: field name: duplicate of rule {seen[rule.name]}: names must be unique"
            )
        seen[rule.name] = index
        rules.append(rule)
    return RuleSet(path=path, rules=tuple(rules))


RULE_FIELDS = ("name", "mode", "role", "dry_run", "when")
WHEN_FIELDS = ("organization", "user", "membership", "invitation", "role", "event")
SECTION_FIELDS = {
    "organization": ("id", "slug", "metadata", "private_metadata"),
    "user": ("id", "email_domain", "identifier", "identifier_regex"),
    "membership": ("metadata", "private_metadata"),
    "invitation": ("metadata", "private_metadata"),
}


class _FieldError(PermanentError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name
        self.message = message


def _parse_rule(raw: Any, *, path: Path | None, index: int) -> Rule:
    if not isinstance(raw, Mapping):
        raise RulesError(f"{_where(path, index=index)}: must be a mapping (name, mode, role, when)")
    name = raw.get("name")
    try:
        return _build_rule(raw, index)
    except _FieldError as exc:
        raise RulesError(
            f"{_where(path, index=index, name=name)}: field {exc.field_name}: {exc.message}"
        ) from None


def _build_rule(raw: Mapping[str, Any], index: int) -> Rule:
    for key in raw:
        if key not in RULE_FIELDS:
            raise _FieldError(str(key), f"unknown field (expected one of {', '.join(RULE_FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _FieldError("name", "required: a non-empty string")
    if len(name) > MAX_NAME or not NAME_PATTERN.match(name):
        raise _FieldError(
            "name",
            f"{name!r}: use at most {MAX_NAME} letters, digits and _ . : @ - (a letter or digit first)",
        )
    mode = raw.get("mode")
    if mode not in MODES:
        raise _FieldError("mode", f"required: one of {', '.join(MODES)}, got {mode!r}")
    role = raw.get("role")
    if not isinstance(role, str) or not role.strip() or role != role.strip():
        raise _FieldError("role", f"required: a role key such as org:admin, got {role!r}")
    dry_run = raw.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _FieldError("dry_run", f"must be true or false, got {dry_run!r}")
    when = raw.get("when", {})
    if when is None:
        when = {}
    if not isinstance(when, Mapping):
        raise _FieldError("when", "must be a mapping of conditions")
    return Rule(index=index, name=name, mode=mode, role=role, dry_run=dry_run, when=_conditions(when))


def _conditions(when: Mapping[str, Any]) -> Conditions:
    for key in when:
        if key not in WHEN_FIELDS:
            raise _FieldError(f"when.{key}", f"unknown condition (expected one of {', '.join(WHEN_FIELDS)})")
    sections: dict[str, Mapping[str, Any]] = {}
    for section, allowed in SECTION_FIELDS.items():
        value = when.get(section, {})
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _FieldError(f"when.{section}", "must be a mapping")
        for key in value:
            if key not in allowed:
                raise _FieldError(
                    f"when.{section}.{key}", f"unknown condition (expected one of {', '.join(allowed)})"
                )
        sections[section] = value
    org, user = sections["organization"], sections["user"]
    membership, invitation = sections["membership"], sections["invitation"]
    events = _strings(when.get("event"), "when.event")
    for event in events:
        if event not in EVENTS:
            raise _FieldError("when.event", f"unknown event {event!r} (expected one of {', '.join(EVENTS)})")
    domains = tuple(
        domain.lower().lstrip("@") for domain in _strings(user.get("email_domain"), "when.user.email_domain")
    )
    for domain in domains:
        if not domain or "@" in domain or (domain.startswith("*") and not domain.startswith("*.")):
            raise _FieldError(
                "when.user.email_domain", f"{domain!r} is not a domain (e.g. acme.com or *.acme.com)"
            )
    regexes = []
    for pattern in _strings(user.get("identifier_regex"), "when.user.identifier_regex"):
        try:
            regexes.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise _FieldError(
                "when.user.identifier_regex", f"invalid regular expression {pattern!r}: {exc}"
            ) from None
    return Conditions(
        organization_ids=_strings(org.get("id"), "when.organization.id"),
        organization_slugs=tuple(s.lower() for s in _strings(org.get("slug"), "when.organization.slug")),
        organization_metadata=_metadata(org.get("metadata"), "when.organization.metadata"),
        organization_private_metadata=_metadata(
            org.get("private_metadata"), "when.organization.private_metadata"
        ),
        user_ids=_strings(user.get("id"), "when.user.id"),
        email_domains=domains,
        identifier_globs=tuple(g.lower() for g in _strings(user.get("identifier"), "when.user.identifier")),
        identifier_regexes=tuple(regexes),
        membership_metadata=_metadata(membership.get("metadata"), "when.membership.metadata"),
        membership_private_metadata=_metadata(
            membership.get("private_metadata"), "when.membership.private_metadata"
        ),
        invitation_metadata=_metadata(invitation.get("metadata"), "when.invitation.metadata"),
        invitation_private_metadata=_metadata(
            invitation.get("private_metadata"), "when.invitation.private_metadata"
        ),
        roles=_strings(when.get("role"), "when.role"),
        events=events,
    )


def _strings(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items: Sequence[Any] = value if isinstance(value, list) else [value]
    if not items:
        raise _FieldError(field_name, "an empty list matches nothing: remove the condition or give a value")
    result = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _FieldError(field_name, f"must be a non-empty string or a list of them, got {item!r}")
        result.append(item.strip())
    return tuple(result)


def _metadata(value: Any, field_name: str) -> tuple[MetadataCondition, ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not value:
        raise _FieldError(field_name, "must be a non-empty mapping of metadata keys to required values")
    conditions = []
    for key, wanted in value.items():
        where = f"{field_name}.{key}"
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise _FieldError(where, "metadata keys must be non-empty strings (dots separate nested keys)")
        accepted = wanted if isinstance(wanted, list) else [wanted]
        if not accepted:
            raise _FieldError(where, "an empty list matches nothing")
        for item in accepted:
            if isinstance(item, Mapping | list):
                raise _FieldError(where, f"values must be strings, numbers, booleans or null, got {item!r}")
            if not isinstance(item, Scalar):
                # TOML dates and times: metadata is JSON, which has none.
                raise _FieldError(where, f"values must be strings, numbers, booleans or null, got {item!r}")
        conditions.append(MetadataCondition(tuple(key.split(".")), tuple(accepted)))
    return tuple(conditions)


def email_domain(identifier: str | None) -> str | None:
    if not identifier or "@" not in identifier:
        return None
    return identifier.rsplit("@", 1)[1].lower()


def domain_matches(domain: str | None, wanted: Sequence[str]) -> bool:
    if domain is None:
        return False
    for pattern in wanted:
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]):
                return True
        elif domain == pattern:
            return True
    return False


def identifier_matches(
    identifier: str | None, globs: Sequence[str], regexes: Sequence[re.Pattern[str]]
) -> bool:
    if identifier is None:
        return False
    lowered = identifier.lower()
    if globs and not any(fnmatch.fnmatchcase(lowered, glob) for glob in globs):
        return False
    return not regexes or any(regex.fullmatch(identifier) for regex in regexes)


def describe_conditions(conditions: Conditions) -> str:
    """The conditions on one line, for people: ``organization.slug=acme; user.email_domain=acme.test``."""
    parts: list[str] = []

    def add(name: str, values: Sequence[Any]) -> None:
        if values:
            parts.append(f"{name}={'|'.join(str(value) for value in values)}")

    def add_metadata(name: str, items: Sequence[MetadataCondition]) -> None:
        for item in items:
            add(f"{name}.{'.'.join(item.path)}", [_json_scalar(value) for value in item.accepted])

    add("organization.id", conditions.organization_ids)
    add("organization.slug", conditions.organization_slugs)
    add_metadata("organization.metadata", conditions.organization_metadata)
    add_metadata("organization.private_metadata", conditions.organization_private_metadata)
    add("user.id", conditions.user_ids)
    add("user.email_domain", conditions.email_domains)
    add("user.identifier", conditions.identifier_globs)
    add("user.identifier_regex", [regex.pattern for regex in conditions.identifier_regexes])
    add_metadata("membership.metadata", conditions.membership_metadata)
    add_metadata("membership.private_metadata", conditions.membership_private_metadata)
    add_metadata("invitation.metadata", conditions.invitation_metadata)
    add_metadata("invitation.private_metadata", conditions.invitation_private_metadata)
    add("role", conditions.roles)
    add("event", conditions.events)
    return "; ".join(parts) or "(every membership)"


def _json_scalar(value: Scalar) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
