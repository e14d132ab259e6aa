"""Markdown tables of a pytest-benchmark JSON file: one table per benchmark group, with each
implementation's median against the group's memory floor and its reference implementation."""

from __future__ import annotations

import json


def _impl(bench: dict) -> str:
    # extra_info["impl"] where a suite records it, else the first parametrize id ("test[fused-1]").
    return bench["extra_info"].get("impl") or bench["name"].split("[")[1].split("-")[0]


def markdown(path: str, reference: str, floor: str) -> str:
    """Tables of min / median (ms), median / floor and reference / this, per group.

    Args:
        path: a file written by ``--benchmark-json``.
        reference: the implementation the speed-ups are relative to (e.g. "composition").
        floor: the memory-floor implementation (e.g. "clone"); groups without it leave the column empty.
    """
    data = json.load(open(path))
    groups: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], {})[_impl(bench)] = bench["stats"]
    lines = []
    for group, rows in groups.items():
        lines += [f"#### {group}", "",
                  f"| implementation | min (ms) | median (ms) | median / {floor} | {reference} / this | rounds |",
                  "|---|---:|---:|---:|---:|---:|"]
        ref, low = rows.get(reference), rows.get(floor)
        for name, st in rows.items():
            vs_floor = f"{st['median'] / low['median']:.2f}" if low else ""
            speedup = f"{ref['median'] / st['median']:.2f}" if ref else ""
            lines.append(f"| {name} | {1e3 * st['min']:.3f} | {1e3 * st['median']:.3f} | {vs_floor} | {speedup} "
                         f"| {st['rounds']} |")
        lines.append("")
    return "\n".join(lines)
