"""The NLI engine's GPU backends side by side on one card: packed flash attention, packed
memory-efficient attention (what a T4 or V100 gets) and padded batches (what a GPU with
neither gets), against the fp32 reference and the Hugging Face pipeline.

    PYTHONUNBUFFERED=1 python benchmarks/backends_ab.py --shape large --labels 4 \\
        --messages 16000 --baseline-messages 8000 --rounds 2 --json OUT.json

The reference workload (docs/PERFORMANCE.md) and ``bench``'s own code paths
(``stream_classifier.tools.bench``): the same random-weight model directory loaded once
per backend through ``NliEngine.load(..., backend=...)`` (so each backend is chosen and
probed as at start-up, and the start-up log line is recorded), warmed up, then for each
round and each backend in turn (interleaved, so a drifting clock or a noisy neighbour
hits all of them alike):

- end to end: a thread tokenizes 1024-message micro-batches while the engine runs them,
  two deep (``bench.run_ours``, the row ``bench`` calls end to end);
- pre-tokenized: the same micro-batches already prepared (``bench.run_prepared``).

Then the largest score difference of each backend from the same model in fp32 (padded
backend) on the first ``--reference-messages`` events and from every other backend on all
events, and the HF ``zero-shot-classification`` pipeline (fp16, ``batch_size=64``) warmed
up and timed on the first ``--baseline-messages`` events (``bench.run_baseline``). Prints
a table; ``--json`` writes everything, the rates of every round included.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import Scores
from stream_classifier.engine.nli import BACKENDS, Backend, NliEngine
from stream_classifier.tools import bench


class Records(logging.Handler):
    """Keeps the engine's log lines (which backend, and why not the others)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def load(model_dir: Path, backend: Backend, budget: int, graphs: bool) -> tuple[NliEngine, float]:
    config = EngineConfig(model=str(model_dir), device="cuda", cuda_graphs=graphs)
    engine = NliEngine.load(config, budget, backend=backend)
    start = time.perf_counter()
    engine.warmup()
    torch.cuda.synchronize()
    return engine, time.perf_counter() - start


def max_diff(ours: list[Scores], theirs: list[Scores]) -> float:
    return bench.max_difference(ours, bench.as_dicts(theirs))


def fmt(diffs: dict[str, float]) -> dict[str, str]:
    return {pair: f"{diff:.1e}" for pair, diff in diffs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="large")
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--messages", type=int, default=16000)
    parser.add_argument("--baseline-messages", type=int, default=bench.MIN_BASELINE_MESSAGES)
    parser.add_argument("--reference-messages", type=int, default=1000)
    parser.add_argument("--backends", default="flash,efficient,padded")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--no-cuda-graphs", dest="graphs", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    names = cast(list[Backend], args.backends.split(","))
    if unknown := [name for name in names if name not in BACKENDS]:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")

    records = Records()
    logging.getLogger("stream_classifier").addHandler(records)
    logging.getLogger("stream_classifier").setLevel(logging.INFO)
    device = torch.device("cuda")
    report: dict[str, Any] = {
        "options": vars(args),
        "environment": bench.environment(device),
    }
    with tempfile.TemporaryDirectory(prefix="backends-ab-") as tmp:
        shape = bench.SHAPES[args.shape]
        model_dir = bench.build_model_dir(shape, Path(tmp) / "m", args.seed)
        events = bench.make_events(args.messages, args.labels, args.seed + args.labels)
        engines: dict[str, NliEngine] = {}
        loaded: dict[str, dict[str, Any]] = {}
        for name in names:
            engine, warmup_s = load(model_dir, name, args.max_batch_tokens, args.graphs)
            engines[name] = engine
            loaded[name] = {
                "backend": engine.backend,
                "notes": list(engine.backend_notes),
                "warmup_s": warmup_s,
            }
            print(f"{name}: {engine.backend} (warm-up {warmup_s:.1f} s)", flush=True)
        report["engines"] = loaded
        report["log"] = list(records.lines)
        peak = bench.matmul_peak(device)
        report["peak_tflops"] = peak / 1e12
        first = engines[names[0]]
        lengths = bench.pair_lengths(first, events)
        flops = sum(shape.flops(n) for n in lengths)
        chunks = list(bench.micro_batches(first, events, 1024, False))

        rates: dict[str, dict[str, list[float]]] = {n: {"e2e": [], "pre": []} for n in names}
        scores: dict[str, list[Scores]] = {}
        for round_ in range(args.rounds):
            for name in names:
                engine = engines[name]
                got, seconds = bench.run_ours(engine, events, 1024, False)
                scores.setdefault(name, got)
                rates[name]["e2e"].append(len(events) / seconds)
                _, seconds = bench.run_prepared(engine, chunks)
                rates[name]["pre"].append(len(events) / seconds)
                print(
                    f"round {round_} {name}: end to end {rates[name]['e2e'][-1]:,.0f} msgs/s, "
                    f"pre-tokenized {rates[name]['pre'][-1]:,.0f}",
                    flush=True,
                )
        report["rates"] = rates
        graphs = {
            name: {
                "captured": getattr(engine.forward, "captured", None),
                "failed": getattr(engine.forward, "failed", None),
            }
            for name, engine in engines.items()
        }
        report["graphs"] = graphs
        report["log_after"] = records.lines[len(report["log"]) :]
        del engines, first, chunks

        fp32 = EngineConfig(model=str(model_dir), device="cuda", dtype="float32")
        reference_engine = NliEngine.load(fp32, args.max_batch_tokens, backend="padded")
        count = min(args.reference_messages, len(events))
        prepared = [
            reference_engine.prepare(e.text, e.labels, bench.TEMPLATE, False)
            for e in events[:count]
        ]
        reference = reference_engine.classify(prepared)
        del reference_engine, prepared
        vs_fp32 = {name: max_diff(scores[name][:count], reference) for name in names}
        pairwise = {
            f"{a} vs {b}": max_diff(scores[a], scores[b])
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        }
        pairwise_reference_messages = {
            f"{a} vs {b}": max_diff(scores[a][:count], scores[b][:count])
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        }
        torch.cuda.empty_cache()

        baseline_count = min(args.baseline_messages, len(events))
        theirs, base_s, _ = bench.run_baseline(model_dir, events[:baseline_count], device, False)
        hf_rate = baseline_count / base_s
        hf_vs_fp32 = bench.max_difference(reference, theirs[:count])
        hf_vs_ours = {name: bench.max_difference(scores[name], theirs) for name in names}

    pairs = len(lengths)
    rows = []
    flash_e2e = statistics.median(rates[names[0]]["e2e"])
    for name in names:
        e2e, pre = statistics.median(rates[name]["e2e"]), statistics.median(rates[name]["pre"])
        rows.append(
            {
                "backend": name,
                "engine_backend": loaded[name]["backend"],
                "e2e_msgs_per_s": e2e,
                "e2e_each_round": rates[name]["e2e"],
                "pre_msgs_per_s": pre,
                "pre_each_round": rates[name]["pre"],
                "pairs_per_s": e2e * pairs / len(events),
                "mfu_e2e": flops * e2e / len(events) / peak,
                "vs_first_e2e": e2e / flash_e2e,
                "speedup_vs_hf_e2e": e2e / hf_rate,
                "max_diff_vs_fp32": vs_fp32[name],
                "max_diff_vs_hf": hf_vs_ours[name],
            }
        )
    report["rows"] = rows
    report["pairwise_max_diff"] = pairwise
    report["pairwise_max_diff_reference_messages"] = pairwise_reference_messages
    report["hf_pipeline"] = {
        "messages": baseline_count,
        "warmup_messages": min(bench.BASELINE_WARMUP_MESSAGES, baseline_count),
        "seconds": base_s,
        "msgs_per_s": hf_rate,
        "max_diff_vs_fp32": hf_vs_fp32,
    }

    print(
        f"\n{report['environment']['device']}, {args.shape} shape, {args.labels} labels, "
        f"{len(events):,} messages, peak {peak / 1e12:.0f} TFLOP/s, medians of {args.rounds} "
        f"interleaved rounds"
    )
    print(
        f"| backend (as loaded) | end to end msgs/s | pre-tokenized msgs/s | MFU end to end "
        f"| end to end / {names[0]} | vs HF ({baseline_count:,} msgs) "
        f"| max abs diff vs fp32 ({count:,} msgs) |"
    )
    print("|" + " --- |" * 7)
    for row in rows:
        print(
            f"| {row['engine_backend']} | {row['e2e_msgs_per_s']:,.0f} "
            f"| {row['pre_msgs_per_s']:,.0f} | {row['mfu_e2e']:.3f} | {row['vs_first_e2e']:.3f} "
            f"| {row['speedup_vs_hf_e2e']:.1f}x | {row['max_diff_vs_fp32']:.1e} |"
        )
    print(
        f"| HF pipeline fp16, batch 64 (warmed up on "
        f"{report['hf_pipeline']['warmup_messages']}) | {hf_rate:,.1f} | | | | 1.0x "
        f"| {hf_vs_fp32:.1e} |"
    )
    print(f"pairwise max abs score diff, all {len(events):,} messages:", fmt(pairwise))
    print(f"same, first {count:,} messages:", fmt(pairwise_reference_messages))
    print("graphs:", graphs)
    for line in report["log"]:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False), "utf-8")


if __name__ == "__main__":
    main()
