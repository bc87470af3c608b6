"""The price catalog: GPUs, measured throughput, storage tiers and network profiles.

The defaults live in ``costmodel/prices.yaml`` (each price with its source and date). :func:`load_catalog` reads
them, deep-merges a user YAML over them (mappings merge key by key), then applies ``section.name.field=value``
overrides, and validates everything into frozen dataclasses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from costmodel.errors import CatalogError, InvalidInput

__all__ = ["GPU", "Throughput", "TierOffer", "Network", "Catalog", "load_catalog", "parse_override"]

_SECTIONS = ("gpus", "throughput", "tiers", "networks")


def _check(owner: str, **values: float | None) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class GPU:
    """One GPU (per-GPU price) and the specs the FLOP estimate uses."""

    name: str
    price_per_hour: float
    peak_tflops: float = 0.0
    """Dense fp16/bf16 tensor peak, TFLOP/s."""
    mem_bandwidth_gbps: float = 0.0
    memory_gb: float = 0.0
    source: str = ""
    as_of: str = ""

    def __post_init__(self) -> None:
        _check(f"gpu {self.name!r}", price_per_hour=self.price_per_hour, peak_tflops=self.peak_tflops,
               mem_bandwidth_gbps=self.mem_bandwidth_gbps, memory_gb=self.memory_gb)


@dataclass(frozen=True)
class Throughput:
    """Measured tokens/s of one model on one GPU (batch of one request)."""

    prefill_tokens_per_s: float | None = None
    """None: prefill time comes from the FLOP estimate."""
    decode_tokens_per_s: float | None = None
    """None: decode time comes from the memory-bandwidth estimate."""
    source: str = ""

    def __post_init__(self) -> None:
        _check("throughput", prefill_tokens_per_s=self.prefill_tokens_per_s,
               decode_tokens_per_s=self.decode_tokens_per_s)
        if self.prefill_tokens_per_s == 0 or self.decode_tokens_per_s == 0:
            raise InvalidInput("throughput: tokens/s must be > 0")


@dataclass(frozen=True)
class Network:
    """Fees for moving bytes to and from a remote tier."""

    name: str
    egress_per_gb: float = 0.0
    link_per_hour: float = 0.0
    link_per_gbps_hour: float = 0.0
    source: str = ""
    as_of: str = ""

    def __post_init__(self) -> None:
        _check(f"network {self.name!r}", egress_per_gb=self.egress_per_gb, link_per_hour=self.link_per_hour,
               link_per_gbps_hour=self.link_per_gbps_hour)


@dataclass(frozen=True)
class TierOffer:
    """One place a context's KV can be kept, with every price resolved to numbers.

    Costs: ``per_gb_hour`` to keep a GB for an hour, ``link_per_hour`` for a provisioned link (charged to the
    kept context), ``get_fee``/``put_fee`` per object request, ``egress_per_gb`` per GB moved in or out.
    Speed: one fetch takes ``latency_s + GB / bandwidth_gbps``.
    """

    name: str
    kind: str
    per_gb_hour: float
    bandwidth_gbps: float
    latency_s: float = 0.0
    get_fee: float = 0.0
    put_fee: float = 0.0
    egress_per_gb: float = 0.0
    link_per_hour: float = 0.0
    link_per_gbps_hour: float = 0.0
    """Provisioned throughput, $ per GB/s per hour; charged for stored GB / SLO when an SLO is given."""
    remote: bool = False
    source: str = ""
    as_of: str = ""

    def __post_init__(self) -> None:
        _check(f"tier {self.name!r}", per_gb_hour=self.per_gb_hour, bandwidth_gbps=self.bandwidth_gbps,
               latency_s=self.latency_s, get_fee=self.get_fee, put_fee=self.put_fee,
               egress_per_gb=self.egress_per_gb, link_per_hour=self.link_per_hour,
               link_per_gbps_hour=self.link_per_gbps_hour)
        if self.bandwidth_gbps <= 0:
            raise InvalidInput(f"tier {self.name!r}: bandwidth_gbps must be > 0")


@dataclass(frozen=True)
class Catalog:
    """A validated catalog. Use :meth:`gpu`, :meth:`network`, :meth:`tier_offers`, :meth:`throughput_for`."""

    gpus: dict[str, GPU]
    throughput: dict[tuple[str, str], Throughput]
    tiers: dict[str, dict[str, Any]]
    """Raw tier entries; resolved against a GPU and network by :meth:`tier_offers`."""
    networks: dict[str, Network]
    hours_per_month: float = 730.0
    defaults: dict[str, Any] = field(default_factory=dict)

    def gpu(self, name: str | None = None) -> GPU:
        name = (name or self.defaults.get("gpu") or "").lower()
        if name not in self.gpus:
            raise InvalidInput(f"unknown GPU {name!r}; known: {', '.join(self.gpus)}")
        return self.gpus[name]

    def network(self, name: str | None = None) -> Network:
        name = name or self.defaults.get("network") or "same-zone"
        if name not in self.networks:
            raise InvalidInput(f"unknown network {name!r}; known: {', '.join(self.networks)}")
        return self.networks[name]

    def throughput_for(self, gpu: str, model: str) -> Throughput | None:
        return self.throughput.get((gpu.lower(), model.lower()))

    def tier_offers(self, gpu: GPU, network: Network | None = None,
                    names: list[str] | None = None) -> list[TierOffer]:
        """The tiers ``names`` (default: ``defaults.tiers``) priced for ``gpu``, remote ones with ``network``'s fees."""
        network = network or self.network()
        names = names or list(self.defaults.get("tiers") or self.tiers)
        offers = []
        for name in names:
            if name not in self.tiers:
                raise InvalidInput(f"unknown tier {name!r}; known: {', '.join(self.tiers)}")
            offers.append(self._resolve(name, self.tiers[name], gpu, network))
        return offers

    def _resolve(self, name: str, raw: dict[str, Any], gpu: GPU, network: Network) -> TierOffer:
        owner = f"tier {name!r}"
        known = {"kind", "per_gb_hour", "per_gb_month", "bandwidth_gbps", "latency_s", "get_fee", "put_fee",
                 "egress_per_gb", "link_per_hour", "link_per_gbps_hour", "remote", "source", "as_of"}
        unknown = set(raw) - known
        if unknown:
            raise CatalogError(f"{owner}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        if "per_gb_hour" in raw and "per_gb_month" in raw:
            raise CatalogError(f"{owner}: give per_gb_hour or per_gb_month, not both")
        if raw.get("per_gb_hour") == "from_gpu":
            if gpu.memory_gb <= 0:
                raise CatalogError(f"{owner}: per_gb_hour from_gpu needs gpu {gpu.name!r} memory_gb")
            per_gb_hour = gpu.price_per_hour / gpu.memory_gb
        elif "per_gb_hour" in raw:
            per_gb_hour = _num(owner, "per_gb_hour", raw["per_gb_hour"])
        elif "per_gb_month" in raw:
            per_gb_hour = _num(owner, "per_gb_month", raw["per_gb_month"]) / self.hours_per_month
        else:
            raise CatalogError(f"{owner}: missing price (per_gb_hour or per_gb_month)")
        if "bandwidth_gbps" not in raw:
            raise CatalogError(f"{owner}: missing bandwidth_gbps")
        remote = bool(raw.get("remote", False))
        offer = TierOffer(
            name=name, kind=str(raw.get("kind", name)), per_gb_hour=per_gb_hour,
            bandwidth_gbps=_num(owner, "bandwidth_gbps", raw["bandwidth_gbps"]),
            latency_s=_num(owner, "latency_s", raw.get("latency_s", 0.0)),
            get_fee=_num(owner, "get_fee", raw.get("get_fee", 0.0)),
            put_fee=_num(owner, "put_fee", raw.get("put_fee", 0.0)),
            egress_per_gb=_num(owner, "egress_per_gb", raw.get("egress_per_gb", 0.0)),
            link_per_hour=_num(owner, "link_per_hour", raw.get("link_per_hour", 0.0)),
            link_per_gbps_hour=_num(owner, "link_per_gbps_hour", raw.get("link_per_gbps_hour", 0.0)),
            remote=remote, source=str(raw.get("source", "")), as_of=str(raw.get("as_of", "")))
        if remote:
            offer = replace(offer, egress_per_gb=offer.egress_per_gb + network.egress_per_gb,
                            link_per_hour=offer.link_per_hour + network.link_per_hour,
                            link_per_gbps_hour=offer.link_per_gbps_hour + network.link_per_gbps_hour)
        return offer


def _num(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CatalogError(f"{owner}: {name} must be a number, got {value!r}")
    _check(owner, **{name: float(value)})
    return float(value)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.name.field=value`` (value as YAML) into ``(path, value)``.

    Tier and network names may contain dots only if quoted in a YAML file; here the path is split on dots
    into at most three parts, so ``tiers.s3.get_fee=1e-6`` works.
    """
    import yaml

    path, sep, value = text.partition("=")
    parts = [p for p in path.strip().split(".", 2) if p]
    if not sep or len(parts) < 2 or parts[0] not in (*_SECTIONS, "defaults", "hours_per_month"):
        raise CatalogError(f"bad override {text!r}; use SECTION.NAME.FIELD=VALUE, SECTION one of {_SECTIONS}")
    try:
        return parts, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise CatalogError(f"bad override value in {text!r}: {exc}") from exc


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    import yaml

    try:
        if path is None:
            text = resources.files("costmodel").joinpath("prices.yaml").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    except OSError as exc:
        raise CatalogError(f"cannot read price catalog {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"invalid YAML in price catalog {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"price catalog {path} must be a mapping")
    return data


def load_catalog(path: str | Path | None = None, overrides: list[str] | None = None) -> Catalog:
    """Load the built-in catalog, merge the YAML at ``path`` over it, then apply ``SECTION.NAME.FIELD=VALUE``."""
    raw = _read_yaml(None)
    if path is not None:
        raw = _deep_merge(raw, _read_yaml(path))
    for text in overrides or []:
        parts, value = parse_override(text)
        node = raw
        for key in parts[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CatalogError(f"override {text!r}: {key!r} is not a mapping")
        node[parts[-1]] = value
    return _build(raw)


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise CatalogError(f"price catalog: {name!r} must map names to mappings")
    return {str(k).lower(): v for k, v in value.items()}


def _build(raw: dict[str, Any]) -> Catalog:
    try:
        gpus = {name: GPU(name=name, **entry) for name, entry in _section(raw, "gpus").items()}
        throughput = {}
        for gpu_name, models in _section(raw, "throughput").items():
            for model, entry in models.items():
                if not isinstance(entry, dict):
                    raise CatalogError(f"throughput.{gpu_name}.{model} must be a mapping")
                throughput[(gpu_name, str(model).lower())] = Throughput(**entry)
        networks = {name: Network(name=name, **entry) for name, entry in _section(raw, "networks").items()}
    except TypeError as exc:  # unknown or missing field
        raise CatalogError(f"price catalog: {exc}") from exc
    except InvalidInput as exc:
        raise CatalogError(f"price catalog: {exc}") from exc
    hours = raw.get("hours_per_month", 730)
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or hours <= 0:
        raise CatalogError(f"price catalog: hours_per_month must be > 0, got {hours!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise CatalogError("price catalog: 'defaults' must be a mapping")
    return Catalog(gpus=gpus, throughput=throughput, tiers=_section(raw, "tiers"), networks=networks,
                   hours_per_month=float(hours), defaults=defaults)
