from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.utils.dateparse import parse_date, parse_datetime

from billing.models import ApiKey
from billing.services import create_api_key
from keyaos.lib.commands import OperatorCommand


class Command(OperatorCommand):
    help = "Create a client API key for /v1. The key is printed once, as the last line."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name")
        parser.add_argument("--budget", help="Budget in USD (lifetime unless --period is given).")
        parser.add_argument(
            "--period", choices=["day", "month"], help="Reset the budget every day or month (UTC)."
        )
        parser.add_argument(
            "--models",
            default="",
            help="Allowed model patterns, comma-separated: 'openai/*,*-mini'.",
        )
        parser.add_argument(
            "--ips", default="", help="Allowed client networks, comma-separated: '10.0.0.0/8'."
        )
        parser.add_argument("--rpm", help="Requests per minute.")
        parser.add_argument("--tpm", help="Tokens per minute.")
        parser.add_argument(
            "--expires", help="Expiry: an ISO date (end of that day, UTC) or date-time."
        )

    def handle(self, *args, **options) -> None:
        try:
            api_key, plain = create_api_key(name=options["name"], **limit_values(options))
        except ValidationError as error:
            raise CommandError(_command_message(error)) from None
        self.stdout.write(
            f"Created client key #{api_key.pk} {api_key.name!r}{describe(api_key)}. "
            "Copy it now: it is stored only as a hash and cannot be shown again."
        )
        self.stdout.write(plain)


# The option that sets each field, to name it in an error.
OPTIONS = {
    "name": "name",
    "budget_usd": "--budget",
    "budget_period": "--period",
    "allowed_models": "--models",
    "allowed_ips": "--ips",
    "rpm_limit": "--rpm",
    "tpm_limit": "--tpm",
    "expires_at": "--expires",
}


def limit_values(options: dict) -> dict:
    """The options as field values (strings parsed); ``validate_limits`` judges them."""
    values: dict = {
        "allowed_models": options.get("models") or "",
        "allowed_ips": options.get("ips") or "",
    }
    if options.get("budget") is not None:
        values["budget_usd"] = _budget(options["budget"])
    if options.get("period"):
        values["budget_period"] = options["period"]
        values.setdefault("budget_usd", None)
    for option, field in (("rpm", "rpm_limit"), ("tpm", "tpm_limit")):
        if options.get(option) is not None:
            values[field] = _whole_number(option, options[option])
    if options.get("expires"):
        values["expires_at"] = _expiry(options["expires"])
    return values


def _command_message(error: ValidationError) -> str:
    return "; ".join(
        f"{OPTIONS.get(field, field)}: {' '.join(messages)}"
        for field, messages in error.message_dict.items()
    )


def describe(api_key: ApiKey) -> str:
    parts = []
    if api_key.budget_usd is not None:
        period = "" if api_key.budget_period == "lifetime" else f" per {api_key.budget_period}"
        parts.append(f"budget {api_key.budget_usd.normalize():f} USD{period}")
    if api_key.allowed_models:
        parts.append("models " + ", ".join(api_key.allowed_models.splitlines()))
    if api_key.allowed_ips:
        parts.append("IPs " + ", ".join(api_key.allowed_ips.splitlines()))
    if api_key.rpm_limit:
        parts.append(f"{api_key.rpm_limit} requests/min")
    if api_key.tpm_limit:
        parts.append(f"{api_key.tpm_limit} tokens/min")
    if api_key.expires_at:
        parts.append(f"expires {api_key.expires_at:%Y-%m-%d %H:%M} UTC")
    return f" ({'; '.join(parts)})" if parts else ""


def _budget(value: str) -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation:
        raise CommandError(f"--budget: {value!r} is not a number of USD.") from None


def _whole_number(option: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CommandError(f"--{option}: {value!r} is not a whole number.") from None


def _expiry(value: str) -> datetime:
    try:
        day = parse_date(value)
        moment = None if day is not None else parse_datetime(value)
    except ValueError:
        moment = day = None
    if moment is None and day is None:
        raise CommandError(f"--expires: {value!r} is not an ISO date (2026-12-31) or date-time.")
    if moment is None:
        moment = datetime.combine(day, time.max, tzinfo=UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment
