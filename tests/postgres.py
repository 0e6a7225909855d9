"""A real PostgreSQL server for the tests: `initdb` in a temporary folder, started on a free loopback
port, stopped at the end. Debian's package (`postgresql`, which .ci/run installs when it is missing)
keeps its programs in /usr/lib/postgresql/N/bin. Where there is none, the tests that need it skip,
saying why; they never pass without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy URL for the async driver the bot uses."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The same, as asyncpg takes it."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, or Debian's newest version."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a throwaway server (trust authentication, loopback only) and stop it afterwards."""
    programs = postgres_bin()
    if programs is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    # PostgreSQL refuses to run as root: as root, run it as Debian's postgres user, in a folder of its
    # own under /tmp (pytest's temporary folders are root's alone).
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    user = "postgres" if as_user else os.environ.get("USER", "postgres")
    folder = Path(tempfile.mkdtemp(prefix="vqgan-bot-postgres-"))
    data = folder / "data"
    data.mkdir()
    if as_user:
        shutil.chown(folder, "postgres")
        shutil.chown(data, "postgres")
    port = _free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    run(str(programs / "initdb"), "-D", str(data), "--auth=trust", "-U", user, "--no-sync", "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off"
    run(str(programs / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"),
        "-w", "-t", "60", "start")
    try:
        yield Postgres(port, user)
    finally:
        run(str(programs / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
