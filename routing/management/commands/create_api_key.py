from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal, InvalidOperation

from django.core.management.base import CommandError
from django.utils.dateparse import parse_date, parse_datetime

from billing.limits import parse_networks, split_list
from billing.models import ApiKey
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
        name = options["name"].strip()
        if not name:
            raise CommandError("The key needs a name.")
        fields = limit_fields(options)
        api_key, plain = ApiKey.create_key(name=name, **fields)
        self.stdout.write(
            f"Created client key #{api_key.pk} {api_key.name!r}{describe(api_key)}. "
            "Copy it now: it is stored only as a hash and cannot be shown again."
        )
        self.stdout.write(plain)


def limit_fields(options: dict) -> dict:
    fields: dict = {}
    if options.get("budget") is not None:
        fields["budget_usd"] = _budget(options["budget"])
    if options.get("period"):
        if "budget_usd" not in fields:
            raise CommandError("--period needs a --budget to reset.")
        fields["budget_period"] = options["period"]
    models = split_list(options.get("models") or "")
    if models:
        fields["allowed_models"] = "\n".join(models)
    ips = options.get("ips") or ""
    if split_list(ips):
        try:
            networks = parse_networks(ips)
        except ValueError as error:
            raise CommandError(f"--ips: {error}") from None
        fields["allowed_ips"] = "\n".join(str(network) for network in networks)
    for option, field in (("rpm", "rpm_limit"), ("tpm", "tpm_limit")):
        if options.get(option) is not None:
            fields[field] = _positive_int(option, options[option])
    if options.get("expires"):
        fields["expires_at"] = _expiry(options["expires"])
    return fields


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
        budget = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"--budget: {value!r} is not a number of USD.") from None
    if not budget.is_finite() or budget < 0:
        raise CommandError("--budget must be zero or more USD.")
    if budget >= Decimal(10) ** 16:
        raise CommandError("--budget is too large.")
    return budget


def _positive_int(option: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CommandError(f"--{option}: {value!r} is not a whole number.") from None
    if number < 1 or number > 2_147_483_647:
        raise CommandError(f"--{option} must be at least 1.")
    return number


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
    if moment <= datetime.now(UTC):
        raise CommandError(f"--expires: {value} is in the past.")
    return moment
