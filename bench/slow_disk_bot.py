"""`python -m bot` on a slow disk, for bench.chaos: every checkpoint write (torch.save to a `.tmp`
file, which the engine then renames into place) goes out in SLOW_CHUNKS pieces with a pause after
each, so that a kill -9 can land inside one. The bot's own code runs unchanged; only the library
call that writes the bytes is slowed, as a busy disk would slow it.
"""

from __future__ import annotations

import io
import os
import sys
import time

import torch

from bot.__main__ import main

SLOW_CHUNKS = 4
PAUSE_S = float(os.environ.get("CHAOS_WRITE_PAUSE_S", "0.05"))
SAVE = torch.save


def slow_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
    if not (isinstance(f, str | os.PathLike) and os.fspath(f).endswith(".tmp")):
        return SAVE(obj, f, *args, **kwargs)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    SAVE(obj, buffer, *args, **kwargs)  # type: ignore[arg-type]
    data = buffer.getvalue()
    size = -(-len(data) // SLOW_CHUNKS)
    with open(f, "wb") as out:
        for start in range(0, len(data), size):
            out.write(data[start:start + size])
            out.flush()
            time.sleep(PAUSE_S)
    return None


if __name__ == "__main__":
    torch.save = slow_save  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
