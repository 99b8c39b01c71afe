"""``python -m tests.serving.stuck_worker TRIGGER``: ``fmstream serve`` (its settings from the
``FMSTREAM_*`` environment) whose Kafka consumer's poll never returns once the file TRIGGER
exists. Its watchdog must end it with status ``serving.worker.EXIT_STUCK``."""

from __future__ import annotations

import sys
from pathlib import Path

from fmstream import app, cli
from tests.serving.faulty_kafka import FaultyConsumer


def main(trigger: Path) -> int:
    make = app.KafkaClients.consumer

    def consumer(self: app.KafkaClients, group_id: str | None, **overrides: object):
        return FaultyConsumer(make(self, group_id, **overrides), trigger.exists, "hang")

    app.KafkaClients.consumer = consumer  # type: ignore[method-assign]
    return cli.main(["-v", "serve"])


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
