"""Database work started from the event loop outside a request, and a lean multi-row INSERT."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import Model
from django.utils.timezone import is_aware


def db_task[**P, R](function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ``function`` in a worker thread and give its connection back afterwards.

    Django closes connections at the end of a request only; background work (the snapshot
    poller, the ledger writer) would otherwise keep one open per thread (see DJANGO_NOTES).
    """

    def closing(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            connection.close()

    return wraps(function)(sync_to_async(closing, thread_sensitive=False))


# Values of these fields need the backend's adaptation (time zone, decimal rounding); the
# drivers take every other value (int, str, bool, None) as it is.
_ADAPTED_FIELDS = {"DateField", "DateTimeField", "DecimalField", "TimeField"}
_TEXT_FIELDS = {"CharField", "TextField", "SlugField", "EmailField", "URLField"}
# Bind parameters in one statement: SQLite allows 32766, PostgreSQL 65535.
_MAX_PARAMETERS = 30000
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(value: str, max_length: int | None) -> str:
    """``value`` as every database stores it: NUL bytes (refused by PostgreSQL) and lone
    surrogates (not UTF-8) replaced by U+FFFD, cut to the column's length."""
    if not value.isascii() or "\x00" in value:
        value = _UNSTORABLE.sub("\ufffd", value)
    return value if max_length is None or len(value) <= max_length else value[:max_length]


class RowInserter:
    """INSERTs many rows of ``model`` in one statement, built once per row count.

    ``bulk_create`` builds a model instance and compiles every field of every row in Python
    (about 0.2 ms a row). Here ``values`` turns a row (field name or attname -> value; a field
    left out gets its default) into the statement's parameters, adapting only what the backend
    must adapt and making text storable (``storable_text``), so the work can be done outside the
    transaction; ``insert`` sends one multi-row statement per chunk. With ``skip_conflicts``
    (a unique column), rows whose value is already present are skipped (``ON CONFLICT DO
    NOTHING``, PostgreSQL and SQLite >= 3.35), and ``returning`` names the columns to return for
    the rows actually inserted.
    """

    def __init__(
        self,
        model: type[Model],
        *,
        skip_conflicts: str | None = None,
        returning: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self.fields = [field for field in model._meta.concrete_fields if not field.primary_key]
        self.known = {name for field in self.fields for name in (field.name, field.attname)}
        self._columns = [(field.name, field.attname, field) for field in self.fields]
        self.skip_conflicts = skip_conflicts
        self.returning = returning
        self._adapted = [
            (index, field, field.get_internal_type())
            for index, field in enumerate(self.fields)
            if field.get_internal_type() in _ADAPTED_FIELDS
        ]
        self._text = [
            (index, field.max_length)
            for index, field in enumerate(self.fields)
            if field.get_internal_type() in _TEXT_FIELDS
        ]
        self._statements: dict[tuple[str, int], str] = {}

    def values(self, row: dict[str, Any]) -> list[Any]:
        if unknown := row.keys() - self.known:
            raise ValueError(f"{self.model.__name__} has no field {', '.join(sorted(unknown))}")
        values = [
            row[name] if name in row else row[attname] if attname in row else field.get_default()
            for name, attname, field in self._columns
        ]
        ops = connection.ops
        for index, field, kind in self._adapted:
            value = values[index]
            # The field's own path (to_python, validation) costs several times the adaptation;
            # a Decimal or an aware datetime needs only the backend's adaptation.
            if kind == "DecimalField" and isinstance(value, Decimal):
                values[index] = ops.adapt_decimalfield_value(
                    value, field.max_digits, field.decimal_places
                )
            elif kind == "DateTimeField" and isinstance(value, datetime) and is_aware(value):
                values[index] = ops.adapt_datetimefield_value(value)
            elif value is not None:
                values[index] = field.get_db_prep_save(value, connection)
        for index, max_length in self._text:
            if isinstance(values[index], str):
                values[index] = storable_text(values[index], max_length)
        return values

    def insert(self, rows: list[list[Any]]) -> list[tuple]:
        """Insert rows made by ``values``; returns the ``returning`` columns of inserted rows."""
        if not rows:
            return []
        if connection.vendor == "postgresql":
            return self._insert_columns(rows)
        chunk = max(_MAX_PARAMETERS // len(self.fields), 1)
        returned: list[tuple] = []
        with connection.cursor() as cursor:
            for begin in range(0, len(rows), chunk):
                part = rows[begin : begin + chunk]
                cursor.execute(self._sql(len(part)), [value for row in part for value in row])
                if self.returning:
                    returned += cursor.fetchall()
        return returned

    def _insert_columns(self, rows: list[list[Any]]) -> list[tuple]:
        """PostgreSQL: one array per column, rows made by ``unnest``. psycopg finds a statement's
        placeholders in Python and keeps the result only for statements of at most 50: a
        500-row VALUES list (15,000 placeholders) cost 60 ms a statement in that search alone."""
        with connection.cursor() as cursor:
            cursor.execute(self._sql(None), [list(column) for column in zip(*rows, strict=True)])
            return cursor.fetchall() if self.returning else []

    def _sql(self, count: int | None) -> str:
        """The statement for ``count`` rows of VALUES, or (None) for column arrays."""
        key = (connection.vendor, count)
        if key not in self._statements:
            quote = connection.ops.quote_name
            if count is None:
                arrays = ", ".join(
                    f"%s::{field.cast_db_type(connection)}[]" for field in self.fields
                )
                rows = f"SELECT * FROM unnest({arrays})"
            else:
                one_row = "({})".format(", ".join(["%s"] * len(self.fields)))
                rows = "VALUES " + ", ".join([one_row] * count)
            sql = "INSERT INTO {} ({}) {}".format(
                quote(self.model._meta.db_table),
                ", ".join(quote(field.column) for field in self.fields),
                rows,
            )
            if self.skip_conflicts:
                column = self.model._meta.get_field(self.skip_conflicts).column
                sql += f" ON CONFLICT ({quote(column)}) DO NOTHING"
            if self.returning:
                columns = (self.model._meta.get_field(name).column for name in self.returning)
                sql += " RETURNING " + ", ".join(quote(column) for column in columns)
            self._statements[key] = sql
        return self._statements[key]


def insert_rows(model: type[Model], rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (field name or attname -> value) in one statement; no keys come back."""
    if rows:
        inserter = RowInserter(model)
        inserter.insert([inserter.values(row) for row in rows])
