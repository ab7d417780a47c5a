"""The engine on a CPU by micro-batch size, with padded passes cut by the token budget only
and with each pass's pairs kept within a fraction of its widest (``CPU_NARROWEST``).

Pre-tokenized micro-batches of ``bench``'s workload (4 labels) go through ``classify``
one after another; every setting runs once per round, rounds interleaved, and the table
gives each setting's median events/s and the share of real tokens among padded ones.

    python benchmarks/cpu_pass_widths.py --shape tiny --events 512 --json out.json

``--narrowest`` lists the fractions to compare (default ``0,0.9``). (A version of this
script, at c69ead9, also tried letting narrower pairs into a pass while its padding stayed
under a few tokens: slower, docs/PERFORMANCE.md.)

``--pieces TOKENS`` instead cuts each micro-batch into pieces of at most TOKENS tokens, as
the engine stage does with a lower level's batch, once in the batch's order and once widest
first (what ``Pieces.split`` does), and scores piece after piece: what the sorting buys.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine import load_engine, shared
from stream_classifier.engine.base import Prepared
from stream_classifier.engine.batches import padded_batches
from stream_classifier.engine.shared import CPU_BATCH_TOKENS, PAD_MULTIPLE
from stream_classifier.scoring import cut_at
from stream_classifier.tools import bench

LABELS = 4


def real_share(chunks: list[list[Prepared]], narrowest: float) -> tuple[float, int]:
    """Real tokens over padded ones, over every pass of these micro-batches; the passes."""
    real = padded = passes = 0
    for chunk in chunks:
        lengths = np.concatenate([np.asarray(p.payload.lengths) for p in chunk])  # type: ignore[attr-defined]
        for rows in padded_batches(lengths, CPU_BATCH_TOKENS, PAD_MULTIPLE, narrowest):
            widths = -(-lengths[rows] // PAD_MULTIPLE) * PAD_MULTIPLE
            padded += int(len(rows) * widths.max())
            passes += 1
        real += int(lengths.sum())
    return real / padded, passes


def pieces(chunk: list[Prepared], tokens: int, widest_first: bool) -> list[list[Prepared]]:
    """``chunk`` cut at ``tokens`` tokens a piece, as ``Pieces.split`` cuts (or in order)."""
    order = list(range(len(chunk)))
    if widest_first:
        order.sort(key=lambda i: -chunk[i].tokens / len(chunk[i].labels))
    cut = cut_at([p.tokens for p in chunk], order, tokens)
    return [[chunk[i] for i in piece] for piece in cut]


def compare_pieces(
    engine: bench.BenchEngine, events: list[bench.Event], args: argparse.Namespace
) -> list[dict[str, object]]:
    """Micro-batches of the first of ``--sizes`` scored piece by piece, in order and widest
    first, rounds interleaved."""
    size = int(args.sizes.split(",")[0])
    chunks = list(bench.micro_batches(engine, events, size, False))
    settings = {"in order": False, "widest first": True}
    cut = {
        name: [p for c in chunks for p in pieces(c, args.pieces, wide)]
        for name, wide in settings.items()
    }
    print("| pieces | count | events/s (median) | rounds | real/padded tokens | passes |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name in settings:
            started = time.perf_counter()
            for piece in cut[name]:
                engine.classify(piece)
            rates[name].append(len(events) / (time.perf_counter() - started))
    rows: list[dict[str, object]] = []
    for name in settings:
        share, passes = real_share(cut[name], shared.CPU_NARROWEST)
        rows.append(
            {
                "pieces": name,
                "tokens": args.pieces,
                "events_per_s": statistics.median(rates[name]),
                "rounds": rates[name],
                "real_share": share,
                "passes": passes,
                "count": len(cut[name]),
            }
        )
        each = ", ".join(f"{r:.1f}" for r in rates[name])
        median = rows[-1]["events_per_s"]
        print(f"| {name} | {len(cut[name])} | {median:.1f} | {each} | {share:.2f} | {passes} |")
    return rows


def compare_widths(
    engine: bench.BenchEngine, events: list[bench.Event], args: argparse.Namespace
) -> list[dict[str, object]]:
    """Micro-batches of each size, passes cut at each ``--narrowest``, rounds interleaved."""
    ratios = [float(r) for r in args.narrowest.split(",")]
    print(
        "| events per batch | narrowest | events/s (median) | rounds "
        "| real/padded tokens | passes |"
    )
    print("| ---: | ---: | ---: | --- | ---: | ---: |")
    rows: list[dict[str, object]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        chunks = list(bench.micro_batches(engine, events, size, False))
        rates: dict[float, list[float]] = {ratio: [] for ratio in ratios}
        for _ in range(args.rounds):
            for ratio in ratios:
                shared.CPU_NARROWEST = ratio
                started = time.perf_counter()
                for chunk in chunks:
                    engine.classify(chunk)
                rates[ratio].append(len(events) / (time.perf_counter() - started))
        for ratio in ratios:
            share, passes = real_share(chunks, ratio)
            median = statistics.median(rates[ratio])
            rows.append(
                {
                    "size": size,
                    "narrowest": ratio,
                    "events_per_s": median,
                    "rounds": rates[ratio],
                    "real_share": share,
                    "passes": passes,
                }
            )
            each = ", ".join(f"{r:.1f}" for r in rates[ratio])
            print(f"| {size} | {ratio:g} | {median:.1f} | {each} | {share:.2f} | {passes} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(bench.SHAPES))
    parser.add_argument("--events", type=int, default=512)
    parser.add_argument("--sizes", default="256,64,16,4,1")
    parser.add_argument("--narrowest", default="0,0.9")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pieces", type=int, help="compare pieces of this many tokens")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = bench.build_model_dir(bench.SHAPES[args.shape], Path(tempfile.mkdtemp()) / "m", 0)
    engine = cast(
        bench.BenchEngine, load_engine(EngineConfig(model=str(model), device="cpu"), 65536)
    )
    engine.warmup()
    events = bench.make_events(args.events, LABELS, 1)
    compare = compare_pieces if args.pieces else compare_widths
    rows = compare(engine, events, args)
    report = {
        "shape": args.shape,
        "events": args.events,
        "labels": LABELS,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
