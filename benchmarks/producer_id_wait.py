"""What a paced benchmark phase sees when its idempotent producer is used at once.

An idempotent producer's first records wait for its producer id, stamped with the time of
``produce()``: a paced phase that starts its clock at once begins with a burst, which the
service then works off as a backlog. This writes ``--records`` records at ``--rate`` per
second to a fresh topic, twice each way: with a producer used at once, and with one from
``kafka_io.idempotent_producer`` (which waits for its id), and prints produce-to-
acknowledgement latency per way.

    python benchmarks/producer_id_wait.py --bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import time
import uuid

from confluent_kafka import KafkaError, Message, Producer

from stream_classifier.tools.kafka_io import create_topics, idempotent_producer


def paced(producer: Producer, topic: str, records: int, rate: float) -> list[float]:
    """Seconds from each ``produce()`` to its acknowledgement, sorted."""
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(records):
        ahead = i / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
        at = time.perf_counter()

        def acked(error: KafkaError | None, _: Message, at: float = at) -> None:
            latencies.append(time.perf_counter() - at)

        producer.produce(topic, value=b"x", key=str(i).encode(), on_delivery=acked)
        producer.poll(0)
    producer.flush(60)
    return sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--rate", type=float, default=500.0)
    args = parser.parse_args()
    topic = f"producer-id-wait-{uuid.uuid4().hex[:8]}"
    create_topics(args.bootstrap, [topic], 12)
    config = {"bootstrap.servers": args.bootstrap, "linger.ms": 1}
    print("| producer | ready after, s | p50 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for way in ("used at once", "id first", "used at once", "id first"):
        made = time.perf_counter()
        if way == "id first":
            producer = idempotent_producer(config)
        else:
            producer = Producer({**config, "enable.idempotence": True})
        ready = time.perf_counter() - made
        lat = paced(producer, topic, args.records, args.rate)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"| {way} | {ready:.2f} | {p50 * 1e3:.0f} | {p99 * 1e3:.0f} | {lat[-1] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
