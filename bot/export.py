"""The generation log as files: rows for a spreadsheet (CSV) or for tools (JSON Lines), sized to fit
Discord's upload limit. Used by /log export and by `python -m bot log` (which also sees DM jobs)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime

import discord

from bot.store import Job
from engine.request import GenerationRequest

EXPORT_ROWS = 100_000  # the most rows one export holds
EXPORT_PAGE = 1000  # rows read at a time


class SinceError(ValueError):
    pass


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """`7d`, `12h`, `30m` ago, or a date `2026-11-01`; None for no limit."""
    if not text:
        return None
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", text.lower())
    if match:
        return now - int(match[1]) * {"d": 86400, "h": 3600, "m": 60}[match[2]]
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise SinceError(f"since takes an age like 7d, 12h or 30m, or a date like 2026-11-01 "
                         f"(got {text!r})") from None


def message_link(job: Job) -> str | None:
    if job.message_id is None or job.guild_id is None or job.deleted_at is not None or job.private:
        return None  # a private picture's reply is ephemeral: no link reaches it
    return f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{job.message_id}"


def export_rows(jobs: list[Job]) -> list[dict]:
    rows = []
    for job in jobs:
        request = GenerationRequest.stored(job.request_json)
        rows.append({
            "job": job.id, "created_at": datetime.fromtimestamp(job.created_at, UTC).isoformat(),
            "member": job.user_id, "channel": job.channel_id, "message": message_link(job) or "",
            "prompt": request.prompt, "negative": request.negative, "style": request.style,
            "seed": request.seed, "width": request.width, "height": request.height, "steps": job.total_steps,
            "image_prompts": len(request.image_prompts), "video": request.video or bool(request.animation),
            "frames": request.animation.frames if request.animation else "",
            "status": job.status,
            "seconds": round(job.seconds, 1) if job.seconds else "",
            "deleted_by": job.deleted_by or "", "expired": bool(job.expired_at), "private": bool(job.private),
        })
    return rows


# A spreadsheet runs a cell that starts like this as a formula (=HYPERLINK(...) and worse); members
# write the prompts, so in CSV such a cell starts with an apostrophe, which shows it as plain text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _as_text(value: object) -> object:
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def encode_export(rows: list[dict], fmt: str, header: bool = True) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["job"])
    if header:
        writer.writeheader()
    writer.writerows({key: _as_text(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue().encode()


class ExportWriter:
    """An export built as its rows come, page by page, in a temporary file that moves to disk past
    SPOOL_BYTES: no export is ever held whole in memory. Its methods encode and compress: call them
    in a thread, never on the event loop."""

    SPOOL_BYTES = 8 * 1024 * 1024

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.header = b""
        self.starts: list[int] = []  # where each row begins: a CSV row may span lines
        # It leaves with the discord.File that sends it, which closes it.
        self.data = tempfile.SpooledTemporaryFile(self.SPOOL_BYTES)  # noqa: SIM115

    def add(self, rows: list[dict]) -> None:
        for index, row in enumerate(rows):
            if not self.starts and index == 0 and self.fmt == "csv":
                self.header = encode_export([row], "csv")[: -len(encode_export([row], "csv", header=False))]
                self.data.write(self.header)
            self.starts.append(self.data.tell())
            self.data.write(encode_export([row], self.fmt, header=False))

    def files(self, limit: int) -> tuple[list[discord.File], str]:
        """Files under the upload limit: plain if it fits, else gzip, else gzip split into parts (each
        a complete file, with its own CSV header)."""
        name = f"generations.{self.fmt}"
        if not self.starts and self.fmt == "csv":
            self.data.write(b"job\r\n")  # an empty export is still a CSV file
        size = self.data.tell()
        self.data.seek(0)
        if size <= limit:
            return [discord.File(self.data, name)], ""
        packed = tempfile.SpooledTemporaryFile(self.SPOOL_BYTES)  # noqa: SIM115 (as above)
        with gzip.GzipFile(fileobj=packed, mode="wb") as gz:
            shutil.copyfileobj(self.data, gz)
        if packed.tell() <= limit:
            packed.seek(0)
            return [discord.File(packed, name + ".gz")], " (compressed with gzip)"
        # Rows per part from the whole's compression ratio, with room to spare.
        per_part = max(1, len(self.starts) * limit // (packed.tell() * 2))
        bounds = [*self.starts, size]
        parts = []
        for first in range(0, len(self.starts), per_part):
            last = min(first + per_part, len(self.starts))
            self.data.seek(bounds[first])
            parts.append(gzip.compress(self.header + self.data.read(bounds[last] - bounds[first])))
        self.data.close()
        files = [discord.File(io.BytesIO(p), f"generations-part{i + 1}.{self.fmt}.gz")
                 for i, p in enumerate(parts)]
        return files, f" (split into {len(files)} gzip parts to fit the upload limit)"


def export_files(rows: list[dict], fmt: str, limit: int) -> tuple[list[discord.File], str]:
    writer = ExportWriter(fmt)
    writer.add(rows)
    return writer.files(limit)
