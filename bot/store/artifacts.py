"""A job's files as rows (table `artifacts`), for PostgreSQL: every worker reads what another wrote.

`bot/artifacts.py` decides where files go (this table with PostgreSQL, OUTPUT_DIR with SQLite); this
is only the SQL. A file a running job writes carries its claim's attempt, and lands only while that
claim holds (the same fence as its progress): a worker that lost its lease overwrites nothing.
(PostgreSQL keeps the space of removed rows for new ones; it gives it back to the disk only with
VACUUM FULL.)
"""

from __future__ import annotations

import functools
import time

from sqlalchemy import Integer, LargeBinary, Text, bindparam, delete, exists, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import Executable

from bot.store.database import Database
from bot.store.records import Job
from bot.store.schema import artifacts, jobs


class ArtifactStore(Database):
    async def put_artifact(self, name: str, data: bytes, job: Job | None = None) -> bool:
        """Keep a file; with `job` (a claimed, running job), only while its claim holds. False: refused,
        the job is another claim's now."""
        values = {"name": name, "data": data, "now": time.time()}
        if job is None:
            await self._rows(_put(self.dialect.name, fenced=False), **values)
            return True
        return bool(await self._rows(_put(self.dialect.name, fenced=True), **values, job_id=job.id,
                                     attempt=job.attempt))

    async def artifact(self, name: str) -> bytes | None:
        rows = await self._rows(GET, name=name)
        return bytes(rows[0][0]) if rows else None

    async def has_artifact(self, name: str) -> bool:
        return bool(await self._rows(HAS, name=name))

    async def delete_artifacts(self, names: list[str]) -> int:
        """Remove these files; returns the bytes they held."""
        freed = 0
        async with self._transaction() as run:
            for name in names:
                freed += sum(row[0] for row in await run(DELETE, name=name))
        return freed

    async def artifact_bytes(self) -> int:
        return (await self._rows(TOTAL))[0][0]

    async def artifact_names(self, ending: str = "") -> list[str]:
        """The names of the files whose names end so (`.checkpoint.pt`), or of all."""
        return [row[0] for row in await self._rows(ENDING, ending=ending)]


@functools.cache
def _put(dialect: str, fenced: bool) -> Executable:
    """Insert or replace a file. Fenced: only while the job is running under this attempt, its row locked
    (FOR SHARE) so that putting the job back in the queue (its lease ran out) waits until the write has
    landed or been refused."""
    make = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    columns = (bindparam("name", type_=Text), bindparam("job_id", type_=Integer),
               bindparam("attempt", type_=Integer), bindparam("data", type_=LargeBinary),
               bindparam("now"))
    if fenced:
        held = (select(jobs.c.id).where(jobs.c.id == bindparam("job_id", type_=Integer),
                                        jobs.c.attempt == bindparam("attempt", type_=Integer),
                                        jobs.c.status == "running")
                .with_for_update(read=True))
        source = select(*columns).where(exists(held))
    else:  # written before any job claims it (an init image): no claim to check
        source = select(bindparam("name", type_=Text), literal(None, Integer), literal(None, Integer),
                        bindparam("data", type_=LargeBinary), bindparam("now")).where(literal(True))
    statement = make(artifacts).from_select(["name", "job_id", "attempt", "data", "written_at"], source)
    statement = statement.on_conflict_do_update(
        index_elements=["name"],
        set_={column: statement.excluded[column] for column in ("job_id", "attempt", "data", "written_at")})
    return statement.returning(artifacts.c.name) if fenced else statement


_named = artifacts.c.name == bindparam("name", type_=Text)
GET = select(artifacts.c.data).where(_named)
HAS = select(literal(1)).where(_named)
DELETE = delete(artifacts).where(_named).returning(func.length(artifacts.c.data))
TOTAL = select(func.coalesce(func.sum(func.length(artifacts.c.data)), 0))
_ending = bindparam("ending", type_=Text)
ENDING = (select(artifacts.c.name)
          .where(func.substr(artifacts.c.name, func.length(artifacts.c.name) - func.length(_ending) + 1)
                 == _ending)
          .order_by(artifacts.c.name))
