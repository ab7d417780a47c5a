"""Messages per second of the embedding and NLI engines as the number of labels grows.

The NLI cross-encoder runs one sentence pair per (text, label), so its cost per message
grows with the labels; the embedding engine embeds each text once and each label once per
process, so its cost does not. Same English texts (examples/eval), same micro-batches, the
engines' own code, steady state (label embeddings cached, warm-up untimed), best of a few
rounds.

NLI: a random-weight BERT of the chosen shape (``base``: 12 layers x 768, as StructBERT
base; ``large``: 24 x 1024, the default StructBERT) with the MiniLM English vocabulary;
its scores are meaningless, its speed is the real one. Embedding: the packaged
all-MiniLM-L6-v2.

    python benchmarks/embedding_vs_nli.py [--labels 4 16 64] [--nli-shape base]
        [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine import Engine, load_engine
from stream_classifier.engine.embedding import packaged_model_dir

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)}
BATCH_MESSAGES = 8
WARMUP_SECONDS = 3.0
TEMPLATE = "This message is about {}."
LABEL_WORDS = [
    "billing",
    "shipping",
    "refund",
    "account",
    "security",
    "privacy",
    "spam",
    "fraud",
    "sports",
    "politics",
    "music",
    "movies",
    "travel",
    "food",
    "health",
    "fitness",
    "science",
    "technology",
    "gaming",
    "fashion",
    "finance",
    "crypto",
    "education",
    "weather",
    "cars",
    "housing",
    "jobs",
    "pets",
    "parenting",
    "religion",
    "history",
    "art",
    "books",
    "comedy",
    "gardening",
    "photography",
    "insurance",
    "taxes",
    "legal",
    "medicine",
    "dating",
    "hiking",
    "cooking",
    "coffee",
    "wine",
    "beer",
    "football",
    "tennis",
    "golf",
    "chess",
    "anime",
    "poetry",
    "theatre",
    "dance",
    "opera",
    "painting",
    "startups",
    "marketing",
    "sales",
    "hardware",
    "software",
    "networking",
    "databases",
    "cloud",
    "mobile",
]


def texts() -> list[str]:
    lines: list[str] = []
    for path in sorted((ROOT / "examples" / "eval").glob("*.jsonl")):
        lines += [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return lines


def build_nli_model(shape: str, directory: Path) -> Path:
    """A random-weight 3-label BERT classifier, saved as a StructBERT-style directory."""
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, heads, intermediate = SHAPES[shape]
    vocab = (packaged_model_dir() / "vocab.txt").read_text(encoding="utf-8")
    config = BertConfig(
        vocab_size=len(vocab.splitlines()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )
    config.num_labels = 3
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config.to_json_string(), encoding="utf-8")
    (directory / "vocab.txt").write_text(vocab, encoding="utf-8")
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def messages_per_second(
    engine: Engine, corpus: Sequence[str], labels: Sequence[str], seconds: float
) -> float:
    """Micro-batches of BATCH_MESSAGES until ``seconds`` have passed (at least one), after
    WARMUP_SECONDS (at least one batch) of the same work untimed."""

    def one_batch(start: int) -> None:
        batch = [corpus[(start + i) % len(corpus)] for i in range(BATCH_MESSAGES)]
        engine.classify([engine.prepare(text, labels, TEMPLATE, False) for text in batch])

    warm_until = time.perf_counter() + WARMUP_SECONDS
    one_batch(0)  # warm-up: caches, allocator, kernels for these shapes
    while time.perf_counter() < warm_until:
        one_batch(0)
    done, began = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - began < seconds:
        one_batch(done)
        done += BATCH_MESSAGES
    return done / (time.perf_counter() - began)


def best_of(
    engine: Engine, corpus: Sequence[str], label_counts: Sequence[int], seconds: float, rounds: int
) -> dict[int, float]:
    """The best of ``rounds`` passes over the label counts (a shared machine is noisy)."""
    best = dict.fromkeys(label_counts, 0.0)
    for _ in range(rounds):
        for count in label_counts:
            rate = messages_per_second(engine, corpus, LABEL_WORDS[:count], seconds)
            best[count] = max(best[count], rate)
    return best


def run(
    label_counts: Sequence[int], shape: str, seconds: float, rounds: int, device: str
) -> dict[str, dict[int, float]]:
    corpus = texts()
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {
            "embedding (all-MiniLM-L6-v2)": EngineConfig(kind="embedding", device=device),
            f"nli (random BERT {shape})": EngineConfig(
                kind="nli", model=str(build_nli_model(shape, Path(tmp) / "nli")), device=device
            ),
        }
        for name, config in engines.items():
            engine = load_engine(config, max_batch_tokens=65536)
            results[name] = best_of(engine, corpus, label_counts, seconds, rounds)
            print(f"{name}: {results[name]}", flush=True)
    return results


def markdown(results: dict[str, dict[int, float]], label_counts: Sequence[int]) -> str:
    header = "| engine | " + " | ".join(f"{n} labels" for n in label_counts) + " |"
    lines = [header, "|" + " --- |" * (len(label_counts) + 1)]
    for name, row in results.items():
        cells = " | ".join(f"{row[n]:.1f} msg/s" for n in label_counts)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--nli-shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many passes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if max(args.labels) > len(LABEL_WORDS):
        parser.error(f"at most {len(LABEL_WORDS)} labels")
    results = run(args.labels, args.nli_shape, args.seconds, args.rounds, args.device)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{BATCH_MESSAGES} messages per batch\n"
    )
    print(markdown(results, args.labels))


if __name__ == "__main__":
    main()
