"""SQL written once, as SQLAlchemy Core over schema.py, and compiled once per database dialect.

SQLAlchemy writes each statement's text for SQLite and for PostgreSQL; the store runs that text on
the driver itself (aiosqlite; asyncpg for PostgreSQL), which costs what hand-written SQL costs.
SQLAlchemy's own async engine would cost 5-9x per statement and 2-3x on a burst of /imagine
(`python -m bench.store_drivers`), more than the 100-ms answer bar leaves.

Statements are module-level constants, or come from cached builders, so each compiles once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Table, Text, bindparam, insert, literal_column, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import Executable, FunctionElement

SQLITE = sqlite.dialect(paramstyle="qmark")
POSTGRESQL = asyncpg_dialect()  # $1, $2 … as asyncpg takes them


@dataclass(frozen=True)
class Prepared:
    """A statement's text for one dialect, the names of its values in order, and the values the
    statement fixes itself."""

    sql: str
    names: tuple[str, ...]
    fixed: dict[str, Any]

    def params(self, values: dict[str, Any]) -> tuple:
        given = {**self.fixed, **values}
        return tuple(given[name] for name in self.names)


_prepared: dict[tuple[int, str], tuple[Executable, Prepared]] = {}


def prepare(statement: Executable, dialect: Dialect) -> Prepared:
    """The statement compiled for the dialect, once (the statement is kept, so its id stays its own)."""
    key = (id(statement), dialect.name)
    found = _prepared.get(key)
    if found is None or found[0] is not statement:
        compiled = statement.compile(dialect=dialect)
        if "POSTCOMPILE" in compiled.string:  # an IN (list) is made at execution: compare one by one
            raise TypeError(f"an expanding IN can't be prepared once: {compiled.string}")
        fixed = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
        found = (statement, Prepared(compiled.string, tuple(compiled.positiontup or ()), fixed))
        _prepared[key] = found
    return found[1]


def values_of(*names: str) -> dict[str, Any]:
    """`.values(...)` for an INSERT or UPDATE whose values come by these names."""
    return {name: bindparam(name) for name in names}


@functools.cache
def upsert(table: Table, keys: tuple[str, ...], dialect: str) -> Executable:
    """INSERT every column of the table, or on a clash of `keys` UPDATE the others: the same words in
    SQLite and PostgreSQL, but each dialect has its own construct for them."""
    make = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    statement = make(table).values(values_of(*(column.name for column in table.c)))
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={column.name: statement.excluded[column.name] for column in table.c if column.name not in keys})


def insert_of(table: Table, *names: str) -> Executable:
    """INSERT of these columns only (the rest take their defaults: an id, a 0)."""
    return insert(table).values(values_of(*names))


def one_of(column: ColumnElement, *values: object) -> ColumnElement[bool]:
    """`column IN (values)` written as comparisons, which compile once (an IN list is made per call)."""
    return or_(*(column == value for value in values))


class JsonText(FunctionElement[str]):
    """A field of a JSON text column, as text (jobs keep their request as JSON text)."""

    type = Text()
    inherit_cache = True


@compiles(JsonText, "sqlite")
def _json_text_sqlite(element: JsonText, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = element.clauses
    return f"json_extract({compiler.process(column, **kw)}, '$.' || {compiler.process(key, **kw)})"


@compiles(JsonText, "postgresql")
def _json_text_postgresql(element: JsonText, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = element.clauses
    return f"(CAST({compiler.process(column, **kw)} AS jsonb) ->> {compiler.process(key, **kw)})"


def json_text(column: ColumnElement[str], key: str) -> JsonText:
    if not key.isidentifier():
        raise ValueError(f"not a JSON key this helper quotes safely: {key!r}")
    return JsonText(column, literal_column(f"'{key}'"))


class HasText(FunctionElement[bool]):
    """Whether the first text holds the second, taken as it is (LIKE would read % and _ in a member's
    search as wildcards)."""

    type = Boolean()
    inherit_cache = True


@compiles(HasText, "sqlite")
def _has_text_sqlite(element: HasText, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(instr({compiler.process(element.clauses, **kw)}) > 0)"


@compiles(HasText, "postgresql")
def _has_text_postgresql(element: HasText, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(strpos({compiler.process(element.clauses, **kw)}) > 0)"
