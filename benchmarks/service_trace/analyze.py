"""Summarise traces written by sitecustomize.py: how busy the device was while saturated.

    python3 benchmarks/service_trace/analyze.py [--tokens N | --last S] TRACE_JSON...

The saturated part is the longest stretch of passes (by tokens) without a device gap of
0.3 s, or with ``--tokens N`` the passes from the first micro-batch submitted until N
tokens are done (the same work in every trace of one workload, gaps included), or with
``--last S`` the passes of the trace's last S seconds (a paced load, the service
benchmark's last phase). For it: the device time of the passes against the stretch's
length, the gaps between passes and whether the engine thread launched the next pass
late, the device time per token of full and short passes, the engine thread's launch
times, and how long it spent on passes run without a graph and on captures. Over the whole
trace, per priority level: how long batches waited from submission to their first launch.
Where the trace has the Kafka thread's loop (``consume`` and the rest), the longest
stretches between two reads that returned live events, and where the thread's time went
in each: waits on the engine stage, writes, tokenizing, consumes, and the rest of the turn.
"""

from __future__ import annotations

import json
import sys
from typing import Any

FULL_TOKENS = 60_000
SEGMENT_GAP_S = 0.3


def saturated(passes: list[list[float]]) -> list[list[float]]:
    ordered = sorted(passes, key=lambda p: p[4])
    stretches, current = [], [ordered[0]]
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after[4] - before[5] > SEGMENT_GAP_S:
            stretches.append(current)
            current = []
        current.append(after)
    stretches.append(current)
    return max(stretches, key=lambda s: sum(p[2] for p in s))


def first_tokens(trace: dict[str, Any], tokens: int) -> list[list[float]]:
    first_submit = trace["submit"][0][0]
    ordered = sorted((p for p in trace["passes"] if p[0] >= first_submit), key=lambda p: p[4])
    done, stretch = 0, []
    for p in ordered:
        if done >= tokens:
            break
        stretch.append(p)
        done += int(p[2])
    return stretch


def last_seconds(trace: dict[str, Any], seconds: float) -> list[list[float]]:
    ordered = sorted(trace["passes"], key=lambda p: p[4])
    since = ordered[-1][5] - seconds
    return [p for p in ordered if p[4] >= since]


def stalls(rows: list[list[Any]], start: float, end: float) -> dict[str, float]:
    """Count, total and longest host time of ``rows`` ([started, ended, ...]) in the window."""
    spans = [row[1] - row[0] for row in rows if start - 1 <= row[0] <= end]
    return {"count": len(spans), "s": sum(spans), "ms_max": max(spans, default=0.0) * 1e3}


def full_collections(trace: dict[str, Any]) -> list[list[Any]]:
    """The oldest generation's collections: the ones long enough to stall the service."""
    return [row for row in trace.get("gc", []) if row[2] == 2]


def summary(
    trace: dict[str, Any], tokens: int | None = None, last: float | None = None
) -> dict[str, Any]:
    if last is not None:
        stretch = last_seconds(trace, last)
    elif tokens is not None:
        stretch = first_tokens(trace, tokens)
    else:
        stretch = saturated(trace["passes"])
    start, end = stretch[0][4], stretch[-1][5]
    busy = sum(p[5] - p[4] for p in stretch)
    gaps = late = 0.0
    for before, after in zip(stretch, stretch[1:], strict=False):
        gap = after[4] - before[5]
        if gap > 0:
            gaps += gap
            if after[1] > before[5]:  # launched only after the device had finished
                late += min(gap, after[1] - before[5])
    full = [p for p in stretch if p[2] >= FULL_TOKENS]
    short = [p for p in stretch if p[2] < FULL_TOKENS]

    def us_per_token(passes: list[list[float]]) -> float | None:
        tokens = sum(p[2] for p in passes)
        return sum(p[5] - p[4] for p in passes) / tokens * 1e6 if tokens else None

    launches = [row[1] - row[0] for row in trace["launch"] if start - 1 <= row[0] <= end]
    submits = [row[0] for row in trace["submit"] if start <= row[0] <= end]
    submit_gaps = [after - before for before, after in zip(submits, submits[1:], strict=False)]
    return {
        "passes": len(stretch),
        "tokens": sum(p[2] for p in stretch),
        "seconds": end - start,
        "device_busy": busy / (end - start),
        "gap_s": gaps,
        "gap_launched_late_s": late,
        "full_passes": len(full),
        "short_passes": len(short),
        "full_us_per_token": us_per_token(full),
        "short_us_per_token": us_per_token(short),
        "launch_ms_mean": sum(launches) / len(launches) * 1e3 if launches else None,
        "submit_gap_ms_max": max(submit_gaps, default=0.0) * 1e3,
        **{f"captures_{k}": v for k, v in stalls(trace["captures"], start, end).items()},
        **{f"eager_{k}": v for k, v in stalls(trace.get("eager", []), start, end).items()},
        **{f"gc2_{k}": v for k, v in stalls(full_collections(trace), start, end).items()},
    }


def percentile(values: list[float], share: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else None


def waits_by_priority(trace: dict[str, Any]) -> dict[str, float | None]:
    """Per priority level: batches, and the ms from a batch's submission to the launch of
    its first piece (p50, p99), the wait for the engine stage. A level's batches launch in
    the order submitted. Traces from before priorities were recorded have no levels."""
    submits: dict[int, list[float]] = {}
    launches: dict[int, list[float]] = {}
    for row in trace["submit"]:
        if len(row) > 2:
            submits.setdefault(row[2], []).append(row[0])
    for row in trace["launch"]:
        if isinstance(row[2], list) and row[2][2] == 0:
            launches.setdefault(row[2][1], []).append(row[0])
    result: dict[str, float | None] = {}
    for level, submitted in sorted(submits.items()):
        pairs = zip(submitted, launches.get(level, []), strict=False)
        queued = [(launched - at) * 1e3 for at, launched in pairs]
        result[f"priority_{level}_batches"] = float(len(submitted))
        result[f"priority_{level}_queued_ms_p50"] = percentile(queued, 0.5)
        result[f"priority_{level}_queued_ms_p99"] = percentile(queued, 0.99)
    return result


#: Kafka-thread records summed in each stretch without live events read.
LOOP_PARTS = ("wait_engine", "write", "prepare", "consume")


def live_read_gaps(trace: dict[str, Any], since: float, count: int = 8) -> list[str]:
    """The ``count`` longest stretches (after ``since``) between reads that returned live
    events, each with the Kafka thread's time in it by part (ms) and what it read."""
    reads = [row for row in trace.get("consume", []) if row[0] >= since]
    live = [row for row in reads if row[3] > 0]
    gaps = sorted(zip(live, live[1:], strict=False), key=lambda pair: pair[0][1] - pair[1][0])
    lines = []
    for before, after in gaps[:count]:
        start, end = before[1], after[0]
        parts = {
            key: sum(
                min(r[1], end) - max(r[0], start) for r in trace[key] if r[1] > start and r[0] < end
            )
            for key in LOOP_PARTS
        }
        inside = [r for r in reads if start <= r[0] < end]
        read = sum(r[2] for r in inside)
        turns = sum(1 for r in trace["turn"] if start <= r[0] < end)
        spent = " ".join(f"{key} {1e3 * value:.0f}" for key, value in parts.items())
        lines.append(
            f"{1e3 * (end - start):.0f} ms: {turns} turns, {len(inside)} reads of {read}"
            f" events (none live), then {after[3]} live; ms in {spent}"
        )
    return lines


def main(arguments: list[str]) -> None:
    tokens = last = None
    if arguments[:1] == ["--tokens"]:
        tokens, arguments = int(arguments[1]), arguments[2:]
    elif arguments[:1] == ["--last"]:
        last, arguments = float(arguments[1]), arguments[2:]
    for path in arguments:
        with open(path, encoding="utf-8") as file:
            trace = json.load(file)
            result = {**summary(trace, tokens, last), **waits_by_priority(trace)}
        print(path)
        for key, value in result.items():
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
        if trace.get("consume"):
            window = last_seconds(trace, last)[0][4] if last is not None else 0.0
            print("  longest stretches without live events read:")
            for line in live_read_gaps(trace, window):
                print(f"    {line}")


if __name__ == "__main__":
    main(sys.argv[1:])
