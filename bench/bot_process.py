"""`python -m bot` for the benchmarks, with one switch for bench.bot_latency.

BENCH_DROP_PROGRESS=1 drops every progress frame at the publisher's door, so the bot runs exactly
as otherwise (previews decoded, checkpoints saved, progress rows written) but sends no progress
edit: the "not publishing" side of the publisher-overhead measurement.
"""

from __future__ import annotations

import os
import sys

from bot.__main__ import main
from bot.publisher import Progress, Publisher


def _drop(self: Publisher, update: Progress) -> None:
    del self, update


if __name__ == "__main__":
    if os.environ.get("BENCH_DROP_PROGRESS") == "1":
        Publisher.progress = _drop  # type: ignore[method-assign]
    sys.exit(main([]))
