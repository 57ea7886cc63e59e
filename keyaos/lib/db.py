"""Database work started from the event loop outside a request, and a lean bulk INSERT."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import Field, Model


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


def insert_rows(model: type[Model], rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (field name or attname -> value; a field left out gets its default).

    ``bulk_create`` builds a model instance and compiles every field of every row in Python,
    about 0.2 ms a row; for the ledger that was most of the writer's time, all of it holding the
    GIL the event loop needs. Here the SQL is built once and only the values that the backend
    must adapt go through their field. One statement per row, not ``executemany`` nor a
    multi-row statement: the database's work then comes in small pieces between which the
    (idle-class) writer thread waits for the core, instead of one burst that PostgreSQL runs at
    normal priority on the gateway's core; ``make bench`` measured a lower p99 on both
    databases. No primary keys come back.
    """
    if not rows:
        return
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    known = {name for field in fields for name in (field.name, field.attname)}
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(model._meta.db_table),
        ", ".join(quote(field.column) for field in fields),
        ", ".join(["%s"] * len(fields)),
    )
    adapted = [
        (index, field.get_db_prep_save)
        for index, field in enumerate(fields)
        if field.get_internal_type() in _ADAPTED_FIELDS
    ]
    with connection.cursor() as cursor:
        for row in rows:
            if unknown := row.keys() - known:
                raise ValueError(f"{model.__name__} has no field {', '.join(sorted(unknown))}")
            values = [_field_value(row, field) for field in fields]
            for index, prepare in adapted:
                values[index] = prepare(values[index], connection)
            cursor.execute(sql, values)


def _field_value(row: dict[str, Any], field: Field) -> Any:
    if field.name in row:
        return row[field.name]
    if field.attname in row:
        return row[field.attname]
    return field.get_default()
