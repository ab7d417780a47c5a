"""Scale 1->3 and kill the first instance (exactly_once), then time how long the input
takes to be committed and count what a read_committed reader sees at that moment.

    KAFKA_BOOTSTRAP=127.0.0.1:9092 python tests/faults/open_transaction_probe.py 8

Not a test: a probe of what docs/RELIABILITY.md ("Found later") describes. When the killed
instance had a transaction open, its offsets stay unstable (``committed()`` times out) and
its output partitions stop read_committed readers until the coordinator aborts it at
``transaction_timeout_ms`` (60 s here); the events are counted again once it has.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]

from confluent_kafka import KafkaException  # noqa: E402
from kafka_helpers import committed, end_offsets, wait_until  # noqa: E402

from faults.harness import FaultRun  # noqa: E402

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
EVENTS = 1500


def outputs_stable(run: FaultRun) -> bool:
    return all(
        end_offsets(BOOTSTRAP, topic, run.partitions)
        == end_offsets(BOOTSTRAP, topic, run.partitions, "read_uncommitted")
        for topic in (run.output, run.dead_letter)
    )


def probe(attempt: int) -> str:
    run = FaultRun(BOOTSTRAP, "exactly_once", Path(tempfile.mkdtemp()), partitions=6)
    run.scale_out_and_kill_first(EVENTS)
    killed = time.monotonic()  # (and half the events again produced)
    timed_out: list[int] = []

    def input_committed() -> bool:
        try:
            return committed(BOOTSTRAP, run.group, run.input, 6) == end_offsets(
                BOOTSTRAP, run.input, 6
            )
        except KafkaException:
            timed_out.append(round(time.monotonic() - killed))
            return False

    wait_until(input_committed, 300, "the input committed")
    line = (
        f"attempt {attempt}: input committed {time.monotonic() - killed:.0f} s after the kill"
        f" (committed() timed out at {timed_out} s); lost {run.count('probe', False).lost},"
        f" outputs stable: {outputs_stable(run)}"
    )
    if not outputs_stable(run):
        wait_until(lambda: outputs_stable(run), 120, "no transaction open on the outputs")
        line += f"; stable {time.monotonic() - killed:.0f} s after the kill"
        line += f", lost then {run.count('probe', False).lost}"
    run.terminate_all()
    return line


if __name__ == "__main__":
    for attempt in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
        print(probe(attempt), flush=True)
