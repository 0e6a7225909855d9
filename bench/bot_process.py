"""`python -m bot` for the benchmarks, with one switch for bench.bot_latency.

SIGUSR1 toggles whether progress frames are dropped at the publisher's door: with them dropped the
bot runs exactly as otherwise (previews decoded, checkpoints saved, progress rows written) but
sends no progress edit, the "not publishing" side of the publisher-overhead measurement. One
process serves both sides, so nothing but that switch differs between them.
"""

from __future__ import annotations

import signal
import sys

from bot.__main__ import main
from bot.publisher import Progress, Publisher

PUBLISH = Publisher.progress


def _drop(self: Publisher, update: Progress) -> None:
    del self, update


def _toggle(signum: int, frame: object) -> None:
    Publisher.progress = _drop if Publisher.progress is PUBLISH else PUBLISH  # type: ignore[method-assign]


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _toggle)
    sys.exit(main([]))
