"""The node's configuration file (YAML): where it listens, its spool, its destinations, and the
routes that say which model explains which images with which methods.

```yaml
ae_title: PELLUCID          # the AE title a PACS routes to
host: 127.0.0.1
port: 11112
spool: /var/spool/pellucid  # durable: nothing is acknowledged before it is written here
settle_seconds: 10          # a study is complete when no instance arrived for this long
workers: 2                  # studies explained at once (each worker has its own model copies)
accept_from: [PACS, CT01]   # calling AE titles let in; absent: any
http_port: 8190             # GET /health, GET /metrics (Prometheus text), on 127.0.0.1
retry: {first_seconds: 2, max_seconds: 300, alert_after_seconds: 600}
destinations:
  pacs: {cstore: {host: 10.0.0.5, port: 104, ae_title: PACS}}
  archive: {stowrs: {url: "https://pacs.example/dicom-web"}}  # credentials: PELLUCID_PACS_USER/_PASSWORD
routes:
  - name: chest
    match: {modality: [CR, DX], body_part: [CHEST]}   # sop_class: [...] too; absent: any
    model: /models/chest-resnet18
    methods: [gradcam, lrp]
    destinations: [pacs]
    segmentation: fractional          # the SEG: binary (default) or fractional
    evidence: /runs/chest-bench       # a `pellucid bench` run of this model: its scores in the SR
```

Every route is checked when the file is read: the model loads and has a card, the methods are
registered, the destinations exist, and the modalities and body parts it matches are within the
card's intended use (a route that sends MR to a chest radiograph model is refused before the node
starts). A mistake is one line naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.errors import ConfigError, PellucidError

MATCH_KEYS = ("modality", "body_part", "sop_class")


@dataclass
class Destination:
    """Where results go: DIMSE C-STORE (``host``, ``port``, ``ae_title``) or STOW-RS (``url``)."""

    name: str
    kind: str  # cstore | stowrs
    host: str = ""
    port: int = 0
    ae_title: str = ""
    url: str = ""

    def describe(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})" if self.kind == "cstore" \
            else f"{self.name} ({self.url})"


@dataclass
class Route:
    """Which images (``match``: modality, body part, SOP class; an absent key matches anything)
    a model explains, with which methods, and where the results go."""

    name: str
    model: str
    methods: list[str]
    destinations: list[str]
    match: dict[str, list[str]] = field(default_factory=dict)
    segmentation: str = "binary"  # the DICOM SEG: binary | fractional
    evidence: str | None = None  # a `pellucid bench` run of the model: its scores go in the SR

    def options(self) -> Any:
        """The case options of this route (those of ``pellucid explain``)."""
        from pellucid.pipeline import CaseOptions

        return CaseOptions(list(self.methods), segmentation=self.segmentation,
                           evidence=Path(self.evidence) if self.evidence else None)

    def takes(self, ds: Any) -> bool:
        """Whether an instance's header falls under this route."""
        values = {"modality": str(ds.get("Modality", "")).upper(),
                  "body_part": str(ds.get("BodyPartExamined", "")).upper(),
                  "sop_class": str(ds.get("SOPClassUID", ""))}
        return all(values[key] in allowed for key, allowed in self.match.items())


@dataclass
class Retry:
    """Delivery retries: the first after ``first_seconds``, doubling up to ``max_seconds``; an
    alert once a destination has failed for ``alert_after_seconds`` (retrying goes on)."""

    first_seconds: float = 2.0
    max_seconds: float = 300.0
    alert_after_seconds: float = 600.0

    def delay(self, attempts: int) -> float:
        """Exponential backoff: first_seconds x 2^(attempts - 1), at most max_seconds."""
        return min(self.max_seconds, self.first_seconds * 2 ** max(0, attempts - 1))


@dataclass
class NodeConfig:
    """The node's settings as :func:`load_node_config` read and checked them."""

    spool: Path
    routes: list[Route]
    destinations: dict[str, Destination]
    ae_title: str = "PELLUCID"
    host: str = "127.0.0.1"
    port: int = 11112
    http_port: int = 0  # 0: no health endpoint
    settle_seconds: float = 10.0
    retry: Retry = field(default_factory=Retry)
    source: str = ""
    workers: int = 1
    accept_from: list[str] = field(default_factory=list)  # empty: any calling AE title


def _number(raw: dict, key: str, default: float, where: str, whole: bool = False,
            low: float = 0.0) -> Any:
    """A numeric setting (``whole``: an integer) at least ``low``, or one line naming it."""
    value = raw.get(key, default)
    ok = isinstance(value, int) if whole else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < low:
        kind = "an integer" if whole else "a number"
        raise ConfigError(f"{where}{key}: {kind} of at least {low:g} is expected, got {value!r}")
    return int(value) if whole else float(value)


def _list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise ConfigError(f"{where}: a name or a non-empty list of names")
    return list(value)


def load_node_config(path: str | Path, check_models: bool = True) -> NodeConfig:
    """Read and check the node's configuration file (see the module's docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such node configuration file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a mapping of settings is expected")
    known = {"ae_title", "host", "port", "spool", "settle_seconds", "http_port", "retry",
             "destinations", "routes", "workers", "accept_from"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "spool" not in raw:
        raise ConfigError(f"{path}: 'spool' (the folder received studies are kept in) is required")
    destinations = {}
    for name, spec in (raw.get("destinations") or {}).items():
        where = f"{path}: destinations.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("cstore", "stowrs"):
            raise ConfigError(f"{where}: one of {{cstore: {{host, port, ae_title}}}} or "
                              f"{{stowrs: {{url}}}}")
        kind, body = next(iter(spec.items()))
        body = body or {}
        if kind == "cstore":
            if not body.get("host") or isinstance(body.get("port"), bool) or \
                    not isinstance(body.get("port"), int):
                raise ConfigError(f"{where}.cstore: host and an integer port are required")
            destinations[name] = Destination(name, kind, str(body["host"]), int(body["port"]),
                                             str(body.get("ae_title", "ANY-SCP")))
        else:
            if not str(body.get("url", "")).startswith(("http://", "https://")):
                raise ConfigError(f"{where}.stowrs: url must be an http(s) address")
            destinations[name] = Destination(name, kind, url=str(body["url"]))
    routes = []
    for k, spec in enumerate(raw.get("routes") or []):
        where = f"{path}: routes[{k}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: a mapping is expected")
        for key in ("model", "methods", "destinations"):
            if key not in spec:
                raise ConfigError(f"{where}: '{key}' is required")
        extra = sorted(set(spec) - {"name", "model", "methods", "destinations", "match",
                                    "segmentation", "evidence"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (known: name, model, "
                              f"methods, destinations, match, segmentation, evidence)")
        match = spec.get("match") or {}
        bad = sorted(set(match) - set(MATCH_KEYS))
        if bad:
            raise ConfigError(f"{where}.match: unknown key(s) {', '.join(bad)} "
                              f"(known: {', '.join(MATCH_KEYS)})")
        route = Route(str(spec.get("name", f"route{k}")), str(spec["model"]),
                      _list(spec["methods"], f"{where}.methods"),
                      _list(spec["destinations"], f"{where}.destinations"),
                      {key: [v if key == "sop_class" else v.upper()
                             for v in _list(value, f"{where}.match.{key}")]
                       for key, value in match.items()},
                      str(spec.get("segmentation", "binary")),
                      None if spec.get("evidence") is None else str(spec["evidence"]))
        try:
            route.options().check()
        except ConfigError as exc:  # the option's own words, under the route's name
            raise ConfigError(f"{where}: {exc}".replace("--", "")) from None
        missing = [d for d in route.destinations if d not in destinations]
        if missing:
            raise ConfigError(f"{where}.destinations: {', '.join(missing)} not among the destinations")
        routes.append(route)
    if not routes:
        raise ConfigError(f"{path}: 'routes' lists no route: the node would explain nothing")
    given = raw.get("retry") or {}
    known_retry = ("first_seconds", "max_seconds", "alert_after_seconds")
    if not isinstance(given, dict) or set(given) - set(known_retry):
        raise ConfigError(f"{path}: retry: a mapping of {', '.join(known_retry)}")
    retry = Retry(**{k: _number(given, k, getattr(Retry, k), f"{path}: retry.", low=0.01)
                     for k in known_retry})
    config = NodeConfig(Path(raw["spool"]), routes, destinations, str(raw.get("ae_title", "PELLUCID")),
                        str(raw.get("host", "127.0.0.1")),
                        _number(raw, "port", 11112, f"{path}: ", whole=True, low=1),
                        _number(raw, "http_port", 0, f"{path}: ", whole=True),
                        _number(raw, "settle_seconds", 10.0, f"{path}: "), retry, str(path),
                        _number(raw, "workers", 1, f"{path}: ", whole=True, low=1))
    if "accept_from" in raw:
        config.accept_from = _list(raw["accept_from"], f"{path}: accept_from")
        too_long = [t for t in config.accept_from if not 0 < len(t.strip()) <= 16]
        if too_long:
            raise ConfigError(f"{path}: accept_from: {too_long[0]!r} is not an AE title (1 to 16 "
                              f"characters)")
    if check_models:
        for k, route in enumerate(routes):
            check_route(route, f"{path}: routes[{k}]")
    return config


def check_route(route: Route, where: str) -> None:
    """The route's model loads with a card, its methods exist, and what it matches is within the
    card's intended use."""
    from pellucid.explainers import available
    from pellucid.models import load_model

    loaded = load_model(route.model)
    if loaded.card is None:
        raise ConfigError(f"{where}.model: {route.model} has no model card: the node cannot know "
                          f"what it takes")
    if getattr(loaded, "framework", None) is not None:  # the node receives DICOM series only
        try:
            loaded.framework.accepts_dicom(Path(route.model))
        except PellucidError as exc:
            raise ConfigError(f"{where}.model: the node receives DICOM, and {exc}") from None
    unknown = [m for m in route.methods if m not in {e["name"] for e in available()}]
    if unknown:
        raise ConfigError(f"{where}.methods: unknown method(s) {', '.join(unknown)}")
    if route.evidence is not None:  # a run of this very model (its weights), or one line why not
        from pellucid.pipeline.evidence import load_options_evidence

        try:
            load_options_evidence(loaded, route.options())
        except PellucidError as exc:
            raise ConfigError(f"{where}.evidence: {exc}".replace("--", "")) from None
    use = loaded.card.intended_use or {}
    for key, card_key in (("modality", "modalities"), ("body_part", "body_parts")):
        stated = [str(v).upper() for v in use.get(card_key, [])]
        if not stated:
            continue
        if key not in route.match:
            raise ConfigError(f"{where}.match.{key}: the model is for {', '.join(stated)} only; the "
                              f"route must say which it takes")
        outside = [v for v in route.match[key] if v not in stated]
        if outside:
            raise ConfigError(f"{where}.match.{key}: {', '.join(outside)} outside the model's "
                              f"intended use ({', '.join(stated)})")
