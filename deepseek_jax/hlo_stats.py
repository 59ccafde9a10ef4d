"""FLOPs and collective bytes per device read from a compiled (SPMD-partitioned) HLO module's text.

XLA's `cost_analysis()` counts a while loop's body once, whatever its trip count, so a
train step with micro-batches (lax.scan), blockwise attention or a chunked head would be
undercounted. Here every computation's own dot FLOPs and collectives are multiplied by how
often it runs: a while body by its `known_trip_count`, a conditional by its most expensive
branch, fusions and calls once.

Collective bytes are the per-device buffer the collective works on: the result for
all-reduce, all-gather (the gathered buffer) and all-to-all, the operand for reduce-scatter
(result x group size). Each is returned with its largest replica-group size and whether a
group spans more than one node (`devices_per_node` consecutive device ids per node).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.+?)\s+([a-z][\w\-]*)\((.*)$")


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: int
    group_size: int
    cross_node: bool
    count: float = 1.0  # times it runs per step


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(type_text)
            if dt in _BYTES]


def _nbytes(type_text: str) -> int:
    return sum(_BYTES[dt] * math.prod(dims) for dt, dims in _shapes(type_text))


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """Device-id groups of a collective: explicit {{0,1},{2,3}} or iota [G,S]<=[dims]T(perm)."""
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        gs = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(gs[0], -1).tolist()
    m = re.search(r"replica_groups=\{(.*?)\}\s*(?:,|$)", attrs)
    if m and m.group(1).strip():
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9,\s]*)\}", m.group(0))]
    return [list(range(num_devices))]


def _dot_flops(rest: str, result_type: str, shapes: dict) -> float:
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    if not operands or operands[0] not in shapes or m is None:
        return 0.0
    lhs = shapes[operands[0]]
    contract = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    out = sum(math.prod(dims) for _, dims in _shapes(result_type))
    return 2.0 * out * contract


@dataclasses.dataclass
class _Comp:
    flops: float = 0.0
    collectives: list = dataclasses.field(default_factory=list)
    calls: list = dataclasses.field(default_factory=list)  # (callee names, multiplier, "max"|"sum")


def _parse(text: str, num_devices: int, devices_per_node: int) -> tuple[dict, Optional[str]]:
    comps, entry, cur, shapes = {}, None, None, {}
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            cur, shapes = h.group(1), {}
            comps[cur] = _Comp()
            if line.startswith("ENTRY"):
                entry = cur
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rtype, op, rest = m.groups()
        s = _shapes(rtype)
        if len(s) == 1:
            shapes[name] = s[0][1]
        comp = comps[cur]
        if op in ("dot", "convolution"):
            comp.flops += _dot_flops(rest, rtype, shapes)
        base = op.removesuffix("-start")
        if base in KINDS and not op.endswith("-done"):
            groups = replica_groups(rest, num_devices)
            size = max(len(g) for g in groups)
            nbytes = _nbytes(rtype)
            if op.endswith("-start") and rtype.startswith("("):
                nbytes //= 2  # an async start returns (operands, results): count the results
            if base == "reduce-scatter":
                nbytes *= size
            cross = any(len({d // devices_per_node for d in g}) > 1 for g in groups)
            comp.collectives.append(Collective(base, nbytes, size, cross))
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", rest)
            cond = re.search(r"condition=%?([\w.\-]+)", rest)
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            n = int(trip.group(1)) if trip else 1
            comp.calls.append(([body.group(1)], n, "sum"))
            if cond:
                comp.calls.append(([cond.group(1)], n + 1, "sum"))
        elif op == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else
                     [x.group(1) for x in re.finditer(r"(?:true|false)_computation=%?([\w.\-]+)", rest)])
            comp.calls.append((names, 1, "max"))
        else:
            for key in ("calls", "to_apply"):
                for callee in re.findall(key + r"=%?([\w.\-]+)", rest):
                    if op not in ("all-reduce", "reduce-scatter", "reduce", "reduce-window", "scatter",
                                  "select-and-scatter", "sort", "map"):
                        comp.calls.append(([callee], 1, "sum"))
    return comps, entry


def analyze(text: str, num_devices: int, devices_per_node: int = 8) -> dict:
    """{"flops": per-device dot FLOPs per step, "collectives": [Collective with count]}."""
    comps, entry = _parse(text, num_devices, devices_per_node)
    memo: dict = {}

    def total(name, depth=0):
        if name in memo:
            return memo[name]
        comp = comps.get(name)
        if comp is None or depth > 200:
            return 0.0, []
        flops, colls = comp.flops, [dataclasses.replace(c) for c in comp.collectives]
        for callees, mult, how in comp.calls:
            subs = [total(c, depth + 1) for c in callees]
            if not subs:
                continue
            if how == "max":  # a conditional runs one branch: count the most expensive
                subs = [max(subs, key=lambda s: (s[0], sum(c.bytes for c in s[1])))]
            for f, cs in subs:
                flops += mult * f
                colls += [dataclasses.replace(c, count=c.count * mult) for c in cs]
        memo[name] = (flops, colls)
        return memo[name]

    flops, colls = total(entry) if entry else (0.0, [])
    return {"flops": flops, "collectives": colls}
