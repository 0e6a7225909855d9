"""`python -m bot` on a slow disk, for bench.chaos: every checkpoint write (the bytes go to a `.tmp`
file, which the bot then renames into place) goes out in SLOW_CHUNKS pieces with a pause after each,
so that a kill -9 can land inside one. The bot's own code runs unchanged; only the library call that
writes the bytes (pathlib's `write_bytes`) is slowed, as a busy disk would slow it.

With SPARE=1 it is bench.chaos's next bot: started while the last one still runs, it does its imports
(seconds of torch and discord.py, which touch neither the database nor Discord) and then waits for a
line on standard input, sent once the last bot is killed, before `main` runs. A restart so costs what
a bot does at its start, not the interpreter's imports, which would be the same in every restart.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bot.__main__ import main

SLOW_CHUNKS = 4
PAUSE_S = float(os.environ.get("CHAOS_WRITE_PAUSE_S", "0.05"))
WRITE_BYTES = Path.write_bytes


def slow_write_bytes(self: Path, data: bytes) -> int:
    if not self.name.endswith(".tmp"):
        return WRITE_BYTES(self, data)
    size = max(1, -(-len(data) // SLOW_CHUNKS))
    with open(self, "wb") as out:
        for start in range(0, len(data), size):
            out.write(data[start:start + size])
            out.flush()
            time.sleep(PAUSE_S)
    return len(data)


if __name__ == "__main__":
    if os.environ.get("SPARE") == "1":
        import bot.app  # noqa: F401  (what the bot imports when it starts: discord.py, torch, open_clip)

        if not sys.stdin.readline():  # the harness went away without starting this bot
            sys.exit(0)
    Path.write_bytes = slow_write_bytes  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
