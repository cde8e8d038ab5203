#!/usr/bin/env python3
"""A queueing model of a CIN network of upload POPs at scale.

Each POP takes uploads (files become `InTransit` when complete), copies them to
the shared final store over its outbound link (then they are `Stored`), and
answers reads. A read at a POP other than the origin, while the file is still
in transit, is proxied from the origin ("forwarded"). The model gives, per POP
and for the network: link utilization, mean time in transit, bytes held on
local disk in transit, outbound link load, forwarding share, bytes and added
latency, and what an origin outage exposes. docs/scale.md explains every
formula.

Two modes:

    python3 docs/scale_model.py [options]        the N-POP network (default 50)
    python3 docs/scale_model.py --sensitivity    the same, plus a sensitivity table
    python3 docs/scale_model.py check [options]  predictions for the 3-POP loopback
                                                 benchmark (`cin-bench network`)

Standard library only; the output depends on the arguments alone (the only
randomness is `random.Random(seed)` for `--placement sphere`).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from dataclasses import dataclass, replace
from typing import Callable, Sequence

KIB = 1024
MIB = 1024**2
GIB = 1024**3

# Size units: binary (KiB) and decimal (KB) bytes.
_SIZE_UNITS: dict[str, float] = {
    "": 1.0,
    "b": 1.0,
    "kib": KIB,
    "mib": MIB,
    "gib": GIB,
    "tib": 1024.0**4,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
}
# Rate units in bits, converted to bytes by dividing by 8.
_BIT_UNITS: dict[str, float] = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
    "tbps": 1e12,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")

# Light in fibre covers about 200 km per ms; real routes are longer than the
# great circle (the 1.4 detour); 2 ms covers the last hops and the stacks.
FIBRE_KM_PER_MS = 200.0
ROUTE_DETOUR = 1.4
RTT_FIXED_MS = 2.0
EARTH_RADIUS_KM = 6371.0

# 50 metros where upload POPs would stand, roughly ordered by how much traffic
# a metro of that size sends; the Zipf ranks follow this order.
METROS: list[tuple[str, float, float]] = [
    ("Ashburn", 39.04, -77.49),
    ("Frankfurt", 50.11, 8.68),
    ("London", 51.51, -0.13),
    ("Tokyo", 35.68, 139.69),
    ("Singapore", 1.35, 103.82),
    ("Amsterdam", 52.37, 4.90),
    ("New York", 40.71, -74.01),
    ("San Jose", 37.34, -121.89),
    ("Los Angeles", 34.05, -118.24),
    ("Chicago", 41.88, -87.63),
    ("Paris", 48.86, 2.35),
    ("Hong Kong", 22.32, 114.17),
    ("Dallas", 32.78, -96.80),
    ("Sao Paulo", -23.55, -46.63),
    ("Sydney", -33.87, 151.21),
    ("Mumbai", 19.08, 72.88),
    ("Seoul", 37.57, 126.98),
    ("Seattle", 47.61, -122.33),
    ("Toronto", 43.65, -79.38),
    ("Miami", 25.76, -80.19),
    ("Stockholm", 59.33, 18.07),
    ("Madrid", 40.42, -3.70),
    ("Milan", 45.46, 9.19),
    ("Atlanta", 33.75, -84.39),
    ("Warsaw", 52.23, 21.01),
    ("Osaka", 34.69, 135.50),
    ("Dubai", 25.20, 55.27),
    ("Johannesburg", -26.20, 28.05),
    ("Denver", 39.74, -104.99),
    ("Chennai", 13.08, 80.27),
    ("Jakarta", -6.21, 106.85),
    ("Mexico City", 19.43, -99.13),
    ("Zurich", 47.38, 8.54),
    ("Vienna", 48.21, 16.37),
    ("Montreal", 45.50, -73.57),
    ("Taipei", 25.03, 121.57),
    ("Bangkok", 13.76, 100.50),
    ("Melbourne", -37.81, 144.96),
    ("Dublin", 53.35, -6.26),
    ("Istanbul", 41.01, 28.98),
    ("Buenos Aires", -34.60, -58.38),
    ("Santiago", -33.45, -70.67),
    ("Bogota", 4.71, -74.07),
    ("Lagos", 6.52, 3.38),
    ("Nairobi", -1.29, 36.82),
    ("Tel Aviv", 32.09, 34.78),
    ("Kuala Lumpur", 3.14, 101.69),
    ("Manila", 14.60, 120.98),
    ("Auckland", -36.85, 174.76),
    ("Cairo", 30.04, 31.24),
]

DEFAULT_SIZE_MIX = "0.7:256KiB,0.25:16MiB,0.05:1GiB"

SizeMix = list[tuple[float, float]]  # (share of files, bytes)


# ---------------------------------------------------------------- parsing


def parse_size(text: str) -> float:
    """Bytes from '4194304', '256KiB', '16MiB', '1GiB', '4MB'."""
    m = _NUMBER_UNIT.match(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4194304, 256KiB, 16MiB, 1GB)")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_rate(text: str) -> float:
    """Bytes/s from '40000000', '40MB/s', '10Gbit/s', '10Gbps'."""
    body = text.strip()
    if body.lower().endswith("/s"):
        body = body[:-2]
    m = _NUMBER_UNIT.match(body)
    if m:
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit in _BIT_UNITS:
            return value * _BIT_UNITS[unit] / 8.0
        if unit in _SIZE_UNITS:
            return value * _SIZE_UNITS[unit]
    raise argparse.ArgumentTypeError(
        f"not a bandwidth: {text!r} (bytes/s, or e.g. 40MB/s, 10Gbit/s, 10Gbps)"
    )


def parse_mix(text: str) -> SizeMix:
    """'0.7:256KiB,0.25:16MiB,0.05:1GiB' -> [(0.7, 262144.0), ...]."""
    mix: SizeMix = []
    for item in text.split(","):
        share, sep, size = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"size mix item {item!r} is not SHARE:SIZE")
        try:
            p = float(share)
        except ValueError:
            raise argparse.ArgumentTypeError(f"size mix share {share!r} is not a number") from None
        if p < 0:
            raise argparse.ArgumentTypeError(f"size mix share {share!r} is negative")
        mix.append((p, parse_size(size)))
    total = sum(p for p, _ in mix)
    # A mix that does not add up is most likely a typo, so refuse it; a tiny
    # rounding error is normalized away.
    if abs(total - 1.0) > 1e-3:
        raise argparse.ArgumentTypeError(f"size mix shares add up to {total:g}, not 1")
    return [(p / total, s) for p, s in mix]


def fmt_size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


# ---------------------------------------------------------------- geometry


def great_circle_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1 = map(math.radians, a)
    lat2, lon2 = map(math.radians, b)
    h = math.sin((lat2 - lat1) / 2) ** 2
    h += math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def rtt_ms(a: tuple[float, float], b: tuple[float, float]) -> float:
    """RTT = 2 * distance / (200 km/ms) * 1.4 + 2 ms."""
    return 2 * great_circle_km(a, b) / FIBRE_KM_PER_MS * ROUTE_DETOUR + RTT_FIXED_MS


def place_pops(n: int, placement: str, seed: int) -> list[tuple[str, float, float]]:
    if placement == "metros":
        if n > len(METROS):
            raise SystemExit(f"--placement metros has {len(METROS)} POPs; use --placement sphere for {n}")
        return METROS[:n]
    rng = random.Random(seed)
    # Uniform over the sphere's area between 60 S and 60 N: sin(latitude) is
    # uniform, longitude is uniform.
    lim = math.sin(math.radians(60.0))
    pops = []
    for i in range(n):
        lat = math.degrees(math.asin(rng.uniform(-lim, lim)))
        lon = rng.uniform(-180.0, 180.0)
        pops.append((f"p{i + 1:02d}", lat, lon))
    return pops


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


# ---------------------------------------------------------------- the model


def p_transit_exp(t: float, tau: float) -> float:
    """P(read delay < transit) with delay ~ Exp(tau), transit ~ Exp(mean t)."""
    return 1.0 if tau <= 0 else t / (t + tau)


def p_transit_det(t: float, tau: float) -> float:
    """P(read delay < transit) with delay ~ Exp(tau), transit fixed at t."""
    return 1.0 if tau <= 0 else -math.expm1(-t / tau)


PTransit = Callable[[float, float], float]


@dataclass(frozen=True)
class Load:
    """What a POP is asked to do (independent of how it does it)."""

    rate: float  # files/s arriving at this POP (it is their origin)
    mix: SizeMix
    bandwidth: float  # bytes/s, outbound link to final storage
    t0: float  # s, fixed per-file overhead of a replication
    discipline: str  # "ps" or "fifo"
    reads_per_file: float
    p_local: float  # share of reads that arrive at the origin
    read_delay_mean: float  # s, mean of the exponential read delay
    shared_link: bool  # forwarded bytes use the same outbound link


@dataclass(frozen=True)
class Result:
    overloaded: bool
    rho: float  # replication bytes / B
    link_util: float  # (replication + forwarded on this link) / B
    transit: list[float]  # s, mean time in transit per size class
    mean_transit: float  # s, over files
    held: float  # bytes held locally in transit (Little, size-weighted)
    elsewhere_share: float  # share of reads at another POP while in transit
    forwarded: float  # bytes/s sent by this origin to other POPs
    link_load: float  # bytes/s on the outbound link to final storage
    in_transit_files: float  # files in transit at a random moment (Little)


def transit_times(rate: float, mix: SizeMix, b_eff: float, t0: float, discipline: str) -> list[float] | None:
    """Mean time in transit per size class, or None if the link is overloaded."""
    if b_eff <= 0:
        return None
    es = sum(p * s for p, s in mix)
    es2 = sum(p * s * s for p, s in mix)
    rho = rate * es / b_eff
    if rho >= 1.0:
        return None
    if discipline == "ps":
        # M/G/1-PS: a file of size s stays (s/B)/(1-rho) on average.
        return [s / b_eff / (1.0 - rho) + t0 for _, s in mix]
    # M/G/1-FIFO: Pollaczek-Khinchine wait, the same for every size, then service.
    wait = rate * es2 / (2.0 * b_eff**2 * (1.0 - rho))
    return [wait + s / b_eff + t0 for _, s in mix]


def solve(load: Load, p_fn: PTransit = p_transit_exp) -> Result:
    """Transit times and forwarding of one POP.

    With a shared link, forwarded bytes take their share of the link and
    replication gets the rest, B - F; F depends on the transit times, which
    depend on B - F. Iterating from F = 0 rises monotonically to the smallest
    fixed point, or past the point where the link is overloaded.
    """
    mix = load.mix
    es = sum(p * s for p, s in mix)
    rho = load.rate * es / load.bandwidth
    elsewhere = 1.0 - load.p_local
    forwarded = 0.0
    transit: list[float] | None = None
    for _ in range(100_000):
        b_eff = load.bandwidth - forwarded if load.shared_link else load.bandwidth
        transit = transit_times(load.rate, mix, b_eff, load.t0, load.discipline)
        if transit is None:
            break
        probs = [p_fn(t, load.read_delay_mean) for t in transit]
        new = load.rate * load.reads_per_file * elsewhere * sum(p * s * q for (p, s), q in zip(mix, probs))
        done = not load.shared_link or abs(new - forwarded) <= 1e-12 * load.bandwidth
        forwarded = new
        if done:
            b_eff = load.bandwidth - forwarded if load.shared_link else load.bandwidth
            transit = transit_times(load.rate, mix, b_eff, load.t0, load.discipline)
            break
    if transit is None:
        # No steady state: the backlog grows. The link carries what it can, so
        # report the offered replication load; the rest has no finite mean.
        inf = math.inf
        offered = load.rate * es
        return Result(True, rho, inf, [inf] * len(mix), inf, inf, elsewhere, inf, offered, inf)
    probs = [p_fn(t, load.read_delay_mean) for t in transit]
    mean_t = sum(p * t for (p, _), t in zip(mix, transit))
    held = load.rate * sum(p * s * t for (p, s), t in zip(mix, transit))
    share = elsewhere * sum(p * q for (p, _), q in zip(mix, probs))
    link_load = load.rate * es + (forwarded if load.shared_link else 0.0)
    return Result(
        overloaded=False,
        rho=rho,
        link_util=link_load / load.bandwidth,
        transit=transit,
        mean_transit=mean_t,
        held=held,
        elsewhere_share=share,
        forwarded=forwarded,
        link_load=link_load,
        in_transit_files=load.rate * mean_t,
    )


# ---------------------------------------------------------------- network mode


@dataclass(frozen=True)
class Pop:
    name: str
    weight: float
    bandwidth: float
    latency_ms: float  # mean added first-byte latency of a read forwarded from here
    load: Load
    res: Result
    res_det: Result  # the same with a fixed (deterministic) transit time


@dataclass(frozen=True)
class Totals:
    rate: float
    bandwidth: float
    rho: float
    mean_transit: float
    held: float
    link_load: float
    elsewhere_share: float
    elsewhere_share_det: float
    forwarded: float
    forwarded_det: float
    latency_ms: float
    exposed_mean: float  # files in transit at a failing POP, mean over POPs
    in_transit_files: float  # files in transit in the whole network
    lost_per_year: float  # bytes


def build_network(args: argparse.Namespace) -> list[Pop]:
    places = place_pops(args.pops, args.placement, args.seed)
    weights = zipf_weights(args.pops, args.zipf_s)
    n = len(places)
    pops: list[Pop] = []
    for i, ((name, lat, lon), w) in enumerate(zip(places, weights)):
        # "weight" keeps the network's total bandwidth (N x B) and shares it
        # as traffic is shared, so every POP has the same rho.
        bw = args.bandwidth * n * w if args.bandwidth_mode == "weight" else args.bandwidth
        others = 1.0 - w
        if n > 1 and others > 0:
            lat_ms = sum(
                weights[j] / others * rtt_ms((lat, lon), (places[j][1], places[j][2]))
                for j in range(n)
                if j != i
            )
            p_local = args.p_local
        else:
            lat_ms, p_local = 0.0, 1.0  # one POP: every read is local
        load = Load(
            rate=args.rate * w,
            mix=args.size_mix,
            bandwidth=bw,
            t0=args.t0,
            discipline=args.discipline,
            reads_per_file=args.reads_per_file,
            p_local=p_local,
            read_delay_mean=args.read_delay_mean,
            shared_link=not args.separate_forward_link,
        )
        pops.append(
            Pop(
                name=name,
                weight=w,
                bandwidth=bw,
                latency_ms=lat_ms + args.proxy_overhead_ms,
                load=load,
                res=solve(load, p_transit_exp),
                res_det=solve(load, p_transit_det),
            )
        )
    return pops


def totals(pops: Sequence[Pop], args: argparse.Namespace) -> Totals:
    """Sums of additive quantities, weighted means of the others, over `pops`."""
    rate = sum(p.load.rate for p in pops)
    bw = sum(p.bandwidth for p in pops)
    repl = sum(p.load.rate * sum(q * s for q, s in p.load.mix) for p in pops)
    reads = sum(p.load.rate * p.load.reads_per_file for p in pops)
    fwd_reads = [p.load.rate * p.load.reads_per_file * p.res.elsewhere_share for p in pops]
    fwd_total = sum(fwd_reads)
    if fwd_total > 0 and math.isfinite(fwd_total):
        latency = sum(r * p.latency_ms for r, p in zip(fwd_reads, pops)) / fwd_total
    else:
        latency = sum(p.load.rate * p.latency_ms for p in pops) / rate if rate else 0.0

    def wmean(values: list[float], weights: list[float]) -> float:
        total = sum(weights)
        return sum(v * w for v, w in zip(values, weights)) / total if total else 0.0

    rates = [p.load.rate for p in pops]
    read_w = [p.load.rate * p.load.reads_per_file for p in pops]
    held = sum(p.res.held for p in pops)
    return Totals(
        rate=rate,
        bandwidth=bw,
        rho=repl / bw if bw else 0.0,
        mean_transit=wmean([p.res.mean_transit for p in pops], rates),
        held=held,
        link_load=sum(p.res.link_load for p in pops),
        elsewhere_share=wmean([p.res.elsewhere_share for p in pops], read_w) if reads else 0.0,
        elsewhere_share_det=wmean([p.res_det.elsewhere_share for p in pops], read_w) if reads else 0.0,
        forwarded=sum(p.res.forwarded for p in pops),
        forwarded_det=sum(p.res_det.forwarded for p in pops),
        latency_ms=latency,
        exposed_mean=sum(p.res.in_transit_files for p in pops) / len(pops) if pops else 0.0,
        in_transit_files=sum(p.res.in_transit_files for p in pops),
        lost_per_year=args.failures_per_year * args.disk_loss_prob * held,
    )


def _f(value: float, digits: int) -> str:
    return "∞" if math.isinf(value) else f"{value:,.{digits}f}"


HEADER = (
    "| POP | λ (files/s) | ρ | mean T (s) | held (GiB) | outbound (Gbit/s) | outbound (% of B) "
    "| reads elsewhere in transit (%) | forwarded (MB/s) | added latency (ms) "
    "| files exposed per outage | lost per year (GiB) |"
)
RULE = "|---|" + "---:|" * 11


def pop_row(p: Pop, args: argparse.Namespace) -> str:
    r = p.res
    if r.overloaded:
        dash = "—"
        cells = [
            p.name,
            _f(p.load.rate, 1),
            f"**{r.rho:.2f}**",
            "overloaded",
            dash,
            f"{p.load.rate * sum(q * s for q, s in p.load.mix) * 8 / 1e9:,.1f} offered",
            f"{r.rho * 100:,.0f} offered",
            dash,
            dash,
            f"{p.latency_ms:.1f}",
            dash,
            dash,
        ]
    else:
        cells = [
            p.name,
            _f(p.load.rate, 1),
            f"{r.rho:.3f}",
            _f(r.mean_transit, 3),
            _f(r.held / GIB, 2),
            _f(r.link_load * 8 / 1e9, 2),
            _f(r.link_load / p.bandwidth * 100, 1),
            f"{r.elsewhere_share * 100:.4f}",
            _f(r.forwarded / 1e6, 3),
            f"{p.latency_ms:.1f}",
            _f(r.in_transit_files, 1),
            _f(args.failures_per_year * args.disk_loss_prob * r.held / GIB, 3),
        ]
    return "| " + " | ".join(cells) + " |"


def totals_row(label: str, t: Totals) -> str:
    cells = [
        label,
        _f(t.rate, 1),
        f"{t.rho:.3f}",
        _f(t.mean_transit, 3),
        _f(t.held / GIB, 2),
        _f(t.link_load * 8 / 1e9, 2),
        _f(t.link_load / t.bandwidth * 100 if t.bandwidth else 0.0, 1),
        "∞" if math.isinf(t.forwarded) else f"{t.elsewhere_share * 100:.4f}",
        _f(t.forwarded / 1e6, 3),
        "∞" if math.isinf(t.forwarded) else f"{t.latency_ms:.1f}",
        _f(t.exposed_mean, 1),
        _f(t.lost_per_year / GIB, 3),
    ]
    return "| " + " | ".join(cells) + " |"


def print_network(args: argparse.Namespace) -> None:
    pops = build_network(args)
    stable = [p for p in pops if not p.res.overloaded]
    over = [p for p in pops if p.res.overloaded]
    mix = args.size_mix
    es = sum(p * s for p, s in mix)
    bw_text = (
        f"{args.bandwidth * 8 / 1e9:g} Gbit/s per POP"
        if args.bandwidth_mode == "flat"
        else f"{args.bandwidth * 8 / 1e9:g} Gbit/s x {len(pops)} shared by weight"
    )
    print(
        f"{len(pops)} POPs ({args.placement}), Zipf s={args.zipf_s:g}, {args.rate:g} files/s in total, "
        f"sizes {', '.join(f'{p * 100:g} % {fmt_size(s)}' for p, s in mix)} (E[S] = {es / 1e6:.2f} MB), "
        f"B = {bw_text}, {args.discipline.upper()}, t0 = {args.t0:g} s, "
        f"{args.reads_per_file:g} reads/file, p_local = {args.p_local:g}, "
        f"read delay mean {args.read_delay_mean:g} s, proxy overhead {args.proxy_overhead_ms:g} ms, "
        f"forwarding {'on its own link' if args.separate_forward_link else 'on the same link'}."
    )
    print()
    print(HEADER)
    print(RULE)
    for p in pops[: args.top]:
        print(pop_row(p, args))
    print(totals_row(f"all {len(pops)}", totals(pops, args)))
    if over and stable:
        print(totals_row(f"{len(stable)} not overloaded", totals(stable, args)))
    print()
    print(
        "Totals: λ, held, outbound, forwarded and lost are sums; ρ is total replication bytes over total B; "
        "mean T is per file; reads elsewhere is per read; added latency is per forwarded read; "
        "files exposed per outage is the mean over POPs (each fails at the same rate)."
        + (" Outbound of an overloaded POP is its offered replication load." if over else "")
    )
    print()
    if stable:
        t = totals(stable, args)
        scope = "" if not over else f" ({len(stable)} POPs not overloaded)"
        print(
            f"- Transit time taken as fixed instead of exponential{scope}: "
            f"reads elsewhere in transit {t.elsewhere_share_det * 100:.4f} %, "
            f"forwarded {t.forwarded_det / 1e6:.3f} MB/s."
        )
        print(
            f"- Exposure{scope}: {len(stable) * args.failures_per_year:g} outages/year, "
            f"{t.in_transit_files:,.1f} files in transit network-wide at any moment, "
            f"{args.failures_per_year * t.in_transit_files:,.1f} files made unavailable per year "
            f"for {args.outage_hours:g} h each, "
            f"{args.failures_per_year * t.in_transit_files * args.outage_hours:,.0f} file-hours/year."
        )
        top = stable[0]
        workers_p = top.res.link_util ** (args.workers + 1)
        print(
            f"- More than {args.workers} files sharing the link at once (PS: ρ^{args.workers + 1}) at "
            f"{top.name}, the largest POP not overloaded: {workers_p * 100:.1f} % of the time."
        )
    if args.t0 > 0:
        # A replication holds its worker for at least t0, so c workers finish
        # at most c / t0 files a second, whatever the bandwidth.
        cap = args.workers / args.t0
        above = [p for p in pops if p.load.rate > cap]
        busiest = max(stable, key=lambda p: p.res.in_transit_files) if stable else None
        busy = (
            f"; most replications at once on average (λT): {busiest.res.in_transit_files:.1f} at {busiest.name}"
            if busiest
            else ""
        )
        print(
            f"- Workers: {args.workers} workers at t0 = {args.t0:g} s finish at most {cap:g} files/s; "
            f"{len(above)} of {len(pops)} POPs receive more{busy}."
        )
    if over:
        growth = [(p.name, p.load.rate * es - p.bandwidth) for p in over]
        shown = ", ".join(f"{name} {g / GIB:,.2f} GiB/s" for name, g in growth[:5])
        print(
            f"- Overloaded (ρ ≥ 1, backlog grows without bound): {len(over)} of {len(pops)} POPs; "
            f"backlog growth {shown}{f' and {len(over) - 5} more' if len(over) > 5 else ''}."
        )
    need = max(p.load.rate * es for p in pops) / args.target_rho
    total_need = sum(p.load.rate * es for p in pops) / args.target_rho
    print(
        f"- Bandwidth for ρ = {args.target_rho:g}: {need * 8 / 1e9:,.1f} Gbit/s at {pops[0].name}, "
        f"{total_need * 8 / 1e9:,.0f} Gbit/s over the network."
    )
    print()
    print_classes(stable[0] if stable else None, mix)
    if args.sensitivity:
        print()
        print_sensitivity(args)


def print_classes(pop: Pop | None, mix: SizeMix) -> None:
    if pop is None:
        print("Every POP is overloaded: no transit time per size class.")
        return
    ps, fifo = solve(replace(pop.load, discipline="ps")), solve(replace(pop.load, discipline="fifo"))
    tau = pop.load.read_delay_mean
    print(f"Transit time per size class at {pop.name} (λ = {pop.load.rate:.1f} files/s, ρ = {pop.res.rho:.3f}):")
    print()
    print("| size | share of files | T ps (s) | T fifo (s) | P(read in transit) ps, exp | ps, fixed T |")
    print("|---|---:|---:|---:|---:|---:|")
    for (share, size), tp, tf in zip(mix, ps.transit, fifo.transit):
        print(
            f"| {fmt_size(size)} | {share * 100:g} % | {_f(tp, 3)} | {_f(tf, 3)} "
            f"| {p_transit_exp(tp, tau) * 100:.4f} % | {p_transit_det(tp, tau) * 100:.4f} % |"
        )


def print_sensitivity(args: argparse.Namespace) -> None:
    cases: list[tuple[str, dict[str, float]]] = [
        (f"as above (τ = {args.read_delay_mean:g} s)", {}),
        ("τ = 60 s", {"read_delay_mean": 60.0}),
        ("τ = 3600 s", {"read_delay_mean": 3600.0}),
        ("B halved", {"bandwidth": args.bandwidth / 2}),
    ]
    print("Sensitivity (totals over the POPs not overloaded in each case):")
    print()
    print(
        "| case | POPs overloaded | λ (files/s) | ρ | mean T (s) | held (GiB) | outbound (Gbit/s) | outbound (% of B) "
        "| reads elsewhere in transit (%) | forwarded (MB/s) | added latency (ms) "
        "| files exposed per outage | lost per year (GiB) |"
    )
    print("|---|" + "---:|" * 12)
    for label, change in cases:
        variant = argparse.Namespace(**{**vars(args), **change})
        pops = build_network(variant)
        stable = [p for p in pops if not p.res.overloaded]
        t = totals(stable, variant)
        row = totals_row(label, t).split(" | ")
        row.insert(1, f"{len(pops) - len(stable)} of {len(pops)}")
        print(" | ".join(row))


# ---------------------------------------------------------------- check mode


def print_check(args: argparse.Namespace) -> None:
    """Predictions for the loopback benchmark: one origin, readers uniform over the POPs."""
    p_local = args.p_local if args.p_local is not None else 1.0 / args.pops
    mix: SizeMix = [(1.0, args.size)]

    def load(discipline: str) -> Load:
        return Load(
            rate=args.rate,
            mix=mix,
            bandwidth=args.bandwidth,
            t0=args.t0,
            discipline=discipline,
            reads_per_file=args.reads_per_file,
            p_local=p_local,
            read_delay_mean=args.read_delay_mean,
            shared_link=args.shared_forward_link,
        )

    ps, fifo = solve(load("ps")), solve(load("fifo"))
    chosen = ps if args.discipline == "ps" else fifo
    chosen_det = solve(load(args.discipline), p_transit_det)
    files = args.rate * args.duration
    reads = files * args.reads_per_file
    out: list[tuple[str, str]] = [
        ("utilization", f"{ps.rho:.4f}"),
    ]
    if chosen.overloaded:
        out.append(("overloaded", "yes: the backlog grows without bound"))
    else:
        out += [
            ("transit_mean_ps_s", _f(ps.mean_transit, 4)),
            ("transit_mean_fifo_s", _f(fifo.mean_transit, 4)),
            (f"p_more_than_{args.workers}_on_link", f"{ps.link_util ** (args.workers + 1):.4f}"),
            (f"files_in_transit_mean_{args.discipline}", f"{chosen.in_transit_files:.3f}"),
            (f"forwarded_read_share_{args.discipline}", f"{chosen.elsewhere_share:.4f}"),
            (f"forwarded_read_share_{args.discipline}_fixed_t", f"{chosen_det.elsewhere_share:.4f}"),
            ("reads_total", f"{reads:.0f}"),
            (f"forwarded_reads_total_{args.discipline}", f"{reads * chosen.elsewhere_share:.1f}"),
            (f"forwarded_bytes_per_s_{args.discipline}", f"{chosen.forwarded:.0f}"),
            (f"forwarded_bytes_total_{args.discipline}", f"{chosen.forwarded * args.duration:.0f}"),
            (f"forwarded_bytes_total_{args.discipline}_fixed_t", f"{chosen_det.forwarded * args.duration:.0f}"),
            ("added_first_byte_latency_ms", f"{args.rtt_ms + args.proxy_overhead_ms:.2f}"),
        ]
    for key, value in out:
        print(f"{key}: {value}")


# ---------------------------------------------------------------- CLI


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Queueing model of a CIN network of upload POPs (see docs/scale.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    net = parser.add_argument_group("network (the default mode)")
    net.add_argument("--pops", type=int, default=50, help="number of POPs")
    net.add_argument("--placement", choices=["metros", "sphere"], default="metros",
                     help="metros: 50 metro coordinates; sphere: seeded random points, latitude within ±60°")
    net.add_argument("--seed", type=int, default=1, help="seed of random.Random for --placement sphere")
    net.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the POP weights")
    net.add_argument("--rate", type=positive_float, default=2000.0, help="files/s over the whole network")
    net.add_argument("--size-mix", type=parse_mix, default=parse_mix(DEFAULT_SIZE_MIX),
                     help=f"SHARE:SIZE,... (default {DEFAULT_SIZE_MIX})")
    net.add_argument("--bandwidth", type=parse_rate, default=parse_rate("40Gbit/s"),
                     help="outbound bandwidth per POP (on average, with --bandwidth-mode weight), bytes/s or with units (10Gbit/s, 40MB/s)")
    net.add_argument("--bandwidth-mode", choices=["flat", "weight"], default="weight",
                     help="flat: B for every POP; weight: N*B shared in proportion to POP weight, as an operator sizes links to traffic")
    net.add_argument("--discipline", choices=["ps", "fifo"], default="ps",
                     help="replication queue: processor sharing or FIFO")
    net.add_argument("--t0", type=float, default=0.05, help="fixed per-file replication overhead, s")
    net.add_argument("--reads-per-file", type=float, default=3.0, help="reads of each file")
    net.add_argument("--p-local", type=probability, default=0.6, help="share of reads at the origin POP")
    net.add_argument("--read-delay-mean", type=float, default=600.0,
                     help="mean of the exponential delay from upload completion to a read, s")
    net.add_argument("--proxy-overhead-ms", type=float, default=0.3,
                     help="proxy overhead before the first byte, ms (cin-bench network: +0.19 to +0.29 ms p50 on loopback)")
    net.add_argument("--separate-forward-link", action="store_true",
                     help="forwarded bytes do not use the link to final storage")
    net.add_argument("--failures-per-year", type=float, default=2.0, help="POP failures per POP per year")
    net.add_argument("--outage-hours", type=float, default=4.0, help="mean outage duration, hours")
    net.add_argument("--disk-loss-prob", type=probability, default=0.01,
                     help="probability that a failure loses the disk for good")
    net.add_argument("--workers", type=int, default=4, help="replication workers per POP")
    net.add_argument("--target-rho", type=probability, default=0.7,
                     help="utilization the bandwidth-needed line is sized for")
    net.add_argument("--top", type=int, default=10, help="POPs shown in the table")
    net.add_argument("--sensitivity", action="store_true",
                     help="also print totals with τ = 60 s, τ = 3600 s and B halved")

    sub = parser.add_subparsers(dest="mode", metavar="check")
    chk = sub.add_parser(
        "check",
        help="predictions for the 3-POP loopback benchmark",
        description="Predictions for `cin-bench network`: uploads of one size at one POP, "
        "reads uniform over the POPs, a bandwidth cap in front of the final store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    chk.add_argument("--pops", type=int, default=3, help="POPs in the benchmark")
    chk.add_argument("--rate", type=positive_float, required=True, help="uploads/s (Poisson) at the origin")
    chk.add_argument("--size", type=parse_size, required=True, help="file size, bytes or with units")
    chk.add_argument("--bandwidth", type=parse_rate, required=True, help="cap on the final store, bytes/s or units")
    chk.add_argument("--read-delay-mean", type=float, required=True, help="mean read delay after completion, s")
    chk.add_argument("--reads-per-file", type=float, default=3.0, help="reads of each file")
    chk.add_argument("--p-local", type=probability, default=None, help="share of reads at the origin (1/pops)")
    chk.add_argument("--t0", type=float, default=0.05, help="fixed per-file replication overhead, s")
    chk.add_argument("--duration", type=positive_float, default=60.0, help="s of uploads counted in the totals")
    chk.add_argument("--discipline", choices=["ps", "fifo"], default="ps",
                     help="queue used for the forwarding lines")
    chk.add_argument("--workers", type=int, default=4, help="replication workers")
    chk.add_argument("--rtt-ms", type=float, default=0.0, help="POP-to-POP RTT, ms (0 on loopback)")
    chk.add_argument("--proxy-overhead-ms", type=float, default=0.3, help="proxy overhead before the first byte, ms")
    chk.add_argument("--shared-forward-link", action="store_true",
                     help="forwarded bytes pass the bandwidth cap too (on loopback they do not)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "check":
        print_check(args)
    else:
        if args.pops < 1:
            raise SystemExit("--pops must be at least 1")
        print_network(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
