"""What a remote tier costs per request: a reserved VM (IaaS) or serverless (FaaS), whichever is
cheaper at the request rate, and the rate at which the two cost the same.

Vectorised over plans: `compute_ms` is an array with one entry per plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitc.targets import Target


@dataclass(frozen=True)
class Workload:
    rate_per_s: float            # requests per second reaching the first tier
    utilisation: float = 0.7     # target utilisation of a reserved replica (headroom for bursts)


def has_price(target: Target) -> bool:
    return "vm_usd_per_hour" in target.price or _has_faas(target)


def _has_faas(target: Target) -> bool:
    return "faas_usd_per_second" in target.price or "faas_usd_per_gb_second" in target.price


def iaas_usd_per_million(target: Target, compute_ms: np.ndarray, rate_per_s: np.ndarray | float, utilisation: float) -> np.ndarray:
    """Replicas sized so each runs at `utilisation` at most; at least one replica runs all hour."""
    price = target.price.get("vm_usd_per_hour")
    if price is None:
        return np.full(np.shape(compute_ms), np.inf)
    rate = np.asarray(rate_per_s, dtype=np.float64)
    busy = rate * np.asarray(compute_ms) / 1e3                      # replica-seconds needed per second
    replicas = np.maximum(1.0, np.ceil(busy / utilisation - 1e-12))
    return np.where(rate > 0, replicas * price / (3600.0 * np.maximum(rate, 1e-300)) * 1e6, np.inf)


def faas_usd_per_million(target: Target, compute_ms: np.ndarray) -> np.ndarray:
    p = target.price
    if not _has_faas(target):
        return np.full(np.shape(compute_ms), np.inf)
    billing = float(p.get("faas_billing_ms", 1.0))
    billed_s = np.ceil(np.asarray(compute_ms) / billing - 1e-9) * billing / 1e3
    per_second = float(p.get("faas_usd_per_second", 0.0)) + float(p.get("faas_usd_per_gb_second", 0.0)) * float(p.get("faas_memory_gb", 1.0))
    return (billed_s * per_second + float(p.get("faas_usd_per_request", 0.0))) * 1e6


def cold_fraction(target: Target, rate_per_s: float) -> float:
    """Share of invocations that find no warm instance: with Poisson arrivals, the chance that
    the gap since the last request exceeds the provider's keep-alive window."""
    keepalive = float(target.price.get("faas_keepalive_s", 600.0))
    return float(np.exp(-max(rate_per_s, 0.0) * keepalive))


def indifference_rate(target: Target, compute_ms: float, utilisation: float) -> float | None:
    """Requests/s above which a reserved VM is cheaper than serverless, or None if it never is.

    Below one replica's capacity a VM's cost per request falls as 1/rate while serverless is flat,
    so they cross where price_per_hour / (3600 x rate) equals the serverless price per request.
    """
    if "vm_usd_per_hour" not in target.price or not _has_faas(target):
        return None
    faas = float(faas_usd_per_million(target, np.array([compute_ms]))[0]) / 1e6
    if faas <= 0:
        return None
    rate = target.price["vm_usd_per_hour"] / (3600.0 * faas)
    # A VM's cost per request is lowest when its replicas are full, at price / (3600 x capacity),
    # the same for any replica count; if the crossing lies past one replica's capacity, serverless
    # is cheaper at every rate.
    capacity = utilisation * 1e3 / max(compute_ms, 1e-9)
    return float(rate) if rate <= capacity else None
