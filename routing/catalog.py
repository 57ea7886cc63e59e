"""What ``GET /v1/models`` lists: canonical models that can be served now, with their best price."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing.currency import UnknownCurrency, to_usd
from routing.dispatcher import AmbiguousModel, ModelNotFound, resolve_model
from routing.errors import model_not_found
from routing.health import HealthBoard
from routing.snapshot import OfferInfo, Snapshot


def list_models(snapshot: Snapshot, board: HealthBoard) -> list[dict[str, Any]]:
    entries = (_entry(snapshot, board, model) for model in sorted(snapshot.offers))
    return [entry for entry in entries if entry is not None]


def model_entry(snapshot: Snapshot, board: HealthBoard, requested: str) -> dict[str, Any]:
    try:
        entry = _entry(snapshot, board, resolve_model(snapshot, requested))
    except (ModelNotFound, AmbiguousModel):
        entry = None
    if entry is None:
        raise model_not_found(requested)
    return entry


def _entry(snapshot: Snapshot, board: HealthBoard, model: str) -> dict[str, Any] | None:
    servable = [
        (offer, price)
        for offer in snapshot.offers.get(model, [])
        if _has_usable_key(snapshot, board, offer)
        and (price := _usd_prices(snapshot, offer)) is not None
    ]
    if not servable:
        return None
    best_offer, (input_usd, output_usd) = min(servable, key=lambda item: sum(item[1]))
    created = min(offer.created for offer, _ in servable)
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": model.split("/", 1)[0] if "/" in model else "keyaos",
        "kind": best_offer.kind,
        "context_length": max((o.context_length or 0) for o, _ in servable) or None,
        "providers": sorted({offer.provider.slug for offer, _ in servable}),
        "pricing": {
            "currency": "USD",
            "unit": "per 1M tokens",
            "input": str(input_usd.normalize()),
            "output": str(output_usd.normalize()),
            "provider": best_offer.provider.slug,
        },
    }


def _has_usable_key(snapshot: Snapshot, board: HealthBoard, offer: OfferInfo) -> bool:
    keys = snapshot.keys.get(offer.provider.id, [])
    return any(
        board.unusable_reason(key) is None or board.lifts_at(key) is not None for key in keys
    )


def _usd_prices(snapshot: Snapshot, offer: OfferInfo) -> tuple[Decimal, Decimal] | None:
    if offer.prices is None:
        return None
    prices = offer.prices
    try:
        return (
            to_usd(prices.input_per_mtok, prices.currency, snapshot.rates),
            to_usd(prices.output_per_mtok, prices.currency, snapshot.rates),
        )
    except UnknownCurrency:
        return None
