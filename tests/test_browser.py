"""The admin dashboard and a model page in headless Chromium, served by the real ASGI app.

Needs Debian's ``chromium`` and ``chromium-driver`` (nothing is downloaded at run time). Screenshots
land in the test's temporary folder; with ``KEYAOS_SCREENSHOTS=docs`` the light-mode dashboard is
also saved as ``docs/dashboard.png`` for the README.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone

from billing.models import ApiKey, CurrencyRate, LedgerEntry
from billing.selectors import day_start
from providers import background
from providers.models import PriceHistory, RefreshResult, RefreshRun, UpstreamKey
from tests.admin_client import add_failover_attempts
from tests.factories import make_key, make_offer, make_provider
from tests.payloads import chat_completion, openrouter_model, serve_openrouter

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install chromium chromium-driver"
DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"no headless browser: {INSTALL_HINT}",
    ),
]
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed: pip install -r requirements.txt"
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

MODEL = "deepseek/deepseek-chat"
PASSWORD = "browser-test-password-1"


@pytest.fixture
def admin_server(settings, transactional_db, monkeypatch):
    """keyaos.asgi's entry point on a free port, its Django handler built with WhiteNoise serving
    static files from the apps' folders (the tests do not run collectstatic)."""
    from django.core.handlers.asgi import ASGIHandler

    import keyaos.asgi
    from tests.fake_upstream import free_port, start_server, stop_server

    settings.WHITENOISE_USE_FINDERS = True
    monkeypatch.setattr(keyaos.asgi, "django_application", ASGIHandler())
    import uvicorn

    port = free_port()
    server = start_server(
        uvicorn.Config(
            keyaos.asgi.application,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
        )
    )
    yield f"http://127.0.0.1:{port}"
    stop_server(server)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1440,1000",
    ):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser("operator", "op@example.com", PASSWORD)


@pytest.fixture
def traffic():
    """A month of requests over four providers, with keys in every state."""
    CurrencyRate.objects.update_or_create(
        currency="CNY", defaults={"usd_per_unit": Decimal("0.14")}
    )
    openrouter = make_provider("openrouter", "http://127.0.0.1:9/api/v1", preset="openrouter")
    deepseek = make_provider("deepseek", "http://127.0.0.1:9/v1", currency="CNY")
    deepinfra = make_provider("deepinfra", "http://127.0.0.1:9/v1/openai")
    zenmux = make_provider("zenmux", "http://127.0.0.1:9/api/v1")
    offers = {
        MODEL: [
            make_offer(openrouter, MODEL, input="0.30", output="0.45"),
            make_offer(deepseek, "deepseek-chat", canonical_id=MODEL, input="2", output="3"),
            make_offer(deepinfra, "deepseek-ai/DeepSeek-V3", canonical_id=MODEL, input="0.38"),
        ],
        "openai/gpt-4o-mini": [
            make_offer(openrouter, "openai/gpt-4o-mini", input="0.15", output="0.60"),
            make_offer(zenmux, "openai/gpt-4o-mini", input="0.15", output="0.60"),
        ],
        "anthropic/claude-sonnet-4": [
            make_offer(openrouter, "anthropic/claude-sonnet-4", input="3", output="15"),
            make_offer(zenmux, "anthropic/claude-sonnet-4", input="3.3", output="16.5"),
        ],
        "meta-llama/llama-3.3-70b-instruct": [
            make_offer(deepinfra, "meta-llama/llama-3.3-70b-instruct", input="0.23", output="0.4")
        ],
        "qwen/qwen3-coder": [make_offer(deepinfra, "qwen/qwen3-coder", input="0.4", output="1.6")],
    }
    keys = {
        "openrouter": make_key(
            openrouter, "sk-or-v1-team-0000000000aa11", label="team", balance=Decimal("42.18")
        ),
        "deepseek": make_key(
            deepseek,
            "sk-ds-main-00000000000bb22",
            label="main",
            balance=Decimal("61.40"),
            multiplier=Decimal("0.8"),
        ),
        "deepinfra": make_key(
            deepinfra, "sk-di-spare-0000000000cc33", label="spare", balance=Decimal("3.10")
        ),
        "zenmux": make_key(zenmux, "sk-zm-promo-0000000000dd44", label="promo", balance=None),
    }
    make_key(
        zenmux,
        "sk-zm-old-00000000000ee55",
        label="old",
        health=UpstreamKey.Health.INVALID,
        last_error="401 Unauthorized: invalid api key",
    )
    make_key(
        openrouter,
        "sk-or-v1-burst-00000000ff66",
        label="burst",
        balance=Decimal("9.75"),
        cooldown_until=timezone.now() + timedelta(seconds=90),
    )
    week = timezone.now() - timedelta(days=21)
    for step, (price_in, price_out) in enumerate([("0.27", "1.10"), ("0.30", "0.45")]):
        PriceHistory.objects.create(
            offer=offers[MODEL][0],
            input_price_per_mtok=Decimal(price_in),
            output_price_per_mtok=Decimal(price_out),
            recorded_at=week + timedelta(days=9 * step),
        )
    for step, (price_in, price_out) in enumerate([("4", "8"), ("2", "3")]):
        PriceHistory.objects.create(
            offer=offers[MODEL][1],
            input_price_per_mtok=Decimal(price_in),
            output_price_per_mtok=Decimal(price_out),
            recorded_at=week + timedelta(days=2 + 12 * step),
        )
    PriceHistory.objects.create(
        offer=offers[MODEL][2],
        input_price_per_mtok=Decimal("0.38"),
        output_price_per_mtok=Decimal("2"),
        recorded_at=week + timedelta(days=5),
    )

    rng = random.Random(5)
    clients = [ApiKey.create_key(name=name)[0] for name in ("web-app", "ci", "laptop")]
    today = timezone.localdate()
    served = [
        ("openrouter", "anthropic/claude-sonnet-4", 6),
        ("openrouter", "openai/gpt-4o-mini", 10),
        ("deepseek", MODEL, 14),
        ("deepinfra", "meta-llama/llama-3.3-70b-instruct", 5),
        ("deepinfra", "qwen/qwen3-coder", 3),
        ("zenmux", "openai/gpt-4o-mini", 4),
    ]
    providers = {p.slug: p for p in (openrouter, deepseek, deepinfra, zenmux)}
    rows = []
    for days_ago in range(30):
        for slug, model, per_day in served:
            for _ in range(rng.randint(per_day // 2, per_day + days_ago % 4)):
                prompt, completion = rng.randint(4000, 90000), rng.randint(500, 16000)
                offer = next(o for o in offers[model] if o.provider.slug == slug)
                list_usd = (
                    prompt * offer.input_price_per_mtok + completion * offer.output_price_per_mtok
                ) / Decimal(1_000_000)
                if slug == "deepseek":
                    list_usd *= Decimal("0.14")
                ok = rng.random() > 0.04
                cost_usd = (list_usd * keys[slug].multiplier).quantize(Decimal("1e-10"))
                rate = Decimal("0.14") if slug == "deepseek" else Decimal(1)
                latency_ms = rng.randint(400, 9000) if ok else rng.randint(50, 900)
                rows.append(
                    LedgerEntry(
                        request_id=f"req-{len(rows)}",
                        created_at=day_start(today - timedelta(days=days_ago))
                        + timedelta(minutes=rng.randint(0, 600)),
                        provider=providers[slug],
                        upstream_key=keys[slug],
                        api_key=rng.choice(clients),
                        requested_model=model,
                        upstream_model=offer.upstream_model_id,
                        endpoint="chat/completions",
                        outcome=LedgerEntry.Outcome.OK
                        if ok
                        else LedgerEntry.Outcome.UPSTREAM_ERROR,
                        status_code=200 if ok else 502,
                        usage_source=LedgerEntry.UsageSource.REPORTED,
                        prompt_tokens=prompt if ok else 0,
                        completion_tokens=completion if ok else 0,
                        cost_usd=cost_usd if ok else 0,
                        cost=(cost_usd / rate).quantize(Decimal("1e-10")) if ok else 0,
                        currency=providers[slug].currency,
                        usd_per_unit=rate,
                        attempts=1,
                        latency_ms=latency_ms,
                        ttfb_ms=rng.randint(150, min(latency_ms, 1500)) if ok else None,
                        list_cost_usd=list_usd.quantize(Decimal("1e-10")) if ok else 0,
                    )
                )
    LedgerEntry.objects.bulk_create(rows, batch_size=2000)
    run = RefreshRun.objects.create(
        trigger=RefreshRun.Trigger.SCHEDULE, duration_ms=1840, error_count=1
    )
    for slug in ("deepinfra", "deepseek", "openrouter"):
        RefreshResult.objects.create(
            run=run, provider=providers[slug], provider_slug=slug, offers_seen=40
        )
    RefreshResult.objects.create(
        run=run,
        provider=zenmux,
        provider_slug="zenmux",
        error="GET /models answered HTTP 503 (Service Unavailable)",
    )
    return rows


def log_in(driver, base_url: str) -> None:
    driver.get(base_url + "/admin/login/?next=/admin/")
    driver.find_element(By.NAME, "username").send_keys("operator")
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    # The dashboard may take a while to come on a loaded machine (CI found it not there yet).
    WebDriverWait(driver, 30).until(
        expected_conditions.presence_of_element_located((By.ID, "kd-figures-title"))
    )


def screenshot(driver, path: Path) -> Path:
    """The whole page, 1440 px wide."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1440, "height": min(height, 5000), "deviceScaleFactor": 1, "mobile": False},
    )
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


def set_colour_scheme(driver, scheme: str) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
    )


def loaded_from_other_hosts(driver, base_url: str) -> list[str]:
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    return [name for name in names if not name.startswith(base_url)]


def test_the_dashboard_and_a_model_page_render_in_a_real_browser(
    admin_server, browser, operator, traffic, tmp_path
):
    log_in(browser, admin_server)
    spent_30_days = sum(row.cost_usd for row in traffic)

    assert browser.title.startswith("Gateway administration")
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.kc-chart")
    assert len(charts) == 3
    assert all(chart.size["width"] > 400 for chart in charts)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.kc-chart rect.kc-bar")) > 30
    figure = browser.find_element(By.CSS_SELECTOR, '[data-figure="spend-30"]').text
    assert figure == f"${spent_30_days.quantize(Decimal('0.01')):,}"
    attention = browser.find_element(By.CLASS_NAME, "kd-attention").text
    assert "zenmux:old" in attention and "openrouter:burst" in attention
    assert "GET /models answered HTTP 503" in browser.page_source
    assert loaded_from_other_hosts(browser, admin_server) == []
    stylesheet_loaded = browser.execute_script(
        "return getComputedStyle(document.querySelector('.kd-layout')).display"
    )
    assert stylesheet_loaded == "grid"
    light_bar = browser.find_element(By.CSS_SELECTOR, "svg.kc-chart rect.kc-s1")
    assert light_bar.value_of_css_property("fill") == "rgb(213, 94, 0)"
    light = screenshot(browser, tmp_path / "dashboard-light.png")

    set_colour_scheme(browser, "dark")
    browser.refresh()
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    bar = browser.find_element(By.CSS_SELECTOR, "svg.kc-chart rect.kc-s1")
    assert background == "rgb(18, 18, 18)"
    assert bar.value_of_css_property("fill") == "rgb(255, 159, 90)"
    screenshot(browser, tmp_path / "dashboard-dark.png")
    set_colour_scheme(browser, "light")

    browser.get(f"{admin_server}/admin/models/{MODEL}/")
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.kc-chart polyline.kc-line")) == 6
    route = browser.find_element(By.ID, "route").text
    assert "It would send a request of 1,000 prompt" in route
    assert "deepseek" in route and "main" in route
    keys = browser.find_element(By.ID, "keys").text
    assert "61.40 CNY" in keys and "sk-ds-main-00000000000bb22" not in browser.page_source
    screenshot(browser, tmp_path / "model-page.png")

    if os.environ.get("KEYAOS_SCREENSHOTS") == "docs":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(light, DOCS / "dashboard.png")
        shutil.copy(tmp_path / "model-page.png", DOCS / "model-page.png")
    if os.environ.get("KEYAOS_SCREENSHOTS_DIR"):
        for name in ("dashboard-light.png", "dashboard-dark.png", "model-page.png"):
            shutil.copy(tmp_path / name, Path(os.environ["KEYAOS_SCREENSHOTS_DIR"]) / name)


# The admin-only quick start: on a fresh database, add a provider from its preset, add its key,
# create a client key, and the first request through the openai SDK is answered, with no command
# run and no button clicked beyond those three forms.

SECRET = "sk-or-v1-quick-start-0000000000000000"


def submit(driver) -> None:
    """Save the form and wait for the page it leads to (a message list, or the form's errors)."""
    form = driver.find_element(By.CSS_SELECTOR, "input[name=_save]")
    form.click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(form))
    WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "ul.messagelist li, .errornote")
    )


def messages(driver) -> str:
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li"))


def test_an_operator_reaches_a_working_request_from_the_admin_alone(
    admin_server, browser, operator, fake_upstream, gateway
):
    openai = pytest.importorskip("openai")
    serve_openrouter(fake_upstream, openrouter_model(MODEL))
    fake_upstream.reply("GET", "/openrouter/key", json_body={"data": {"label": "quick"}})
    fake_upstream.reply(
        "GET",
        "/openrouter/credits",
        json_body={"data": {"total_credits": 10, "total_usage": 1.5}},
    )
    fake_upstream.reply("POST", "/openrouter/chat/completions", json_body=chat_completion(MODEL))

    log_in(browser, admin_server)

    # 1. A provider from its preset (the URL points at the fake instead of openrouter.ai).
    browser.get(admin_server + "/admin/providers/provider/add/?preset=openrouter")
    base_url = browser.find_element(By.NAME, "base_url")
    base_url.clear()
    base_url.send_keys(fake_upstream.url("openrouter"))
    submit(browser)
    assert "first refresh of openrouter" in messages(browser)

    # 2. Its key.
    browser.get(admin_server + "/admin/providers/upstreamkey/add/")
    browser.find_element(By.CSS_SELECTOR, "select[name=provider] option:nth-child(2)").click()
    browser.find_element(By.NAME, "secret").send_keys(SECRET)
    submit(browser)
    assert "Checking the key" in messages(browser)

    # 3. A client key, shown once.
    browser.get(admin_server + "/admin/billing/apikey/add/")
    browser.find_element(By.NAME, "name").send_keys("laptop")
    submit(browser)
    plain = re.search(r"sk-keyaos-\S+", messages(browser)).group(0)

    # The operator copies the key; the background work has had a moment (tests wait for it).
    background.wait()
    deadline = time.monotonic() + 30
    client = openai.OpenAI(base_url=gateway.url, api_key=plain, max_retries=0)
    while True:
        try:
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
            break
        except (openai.NotFoundError, openai.InternalServerError):
            # The gateway reads the new offers at its next snapshot poll (0.1 s in tests; a
            # loaded machine may take longer).
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert answer.choices[0].message.content == "Hello!"
    assert fake_upstream.received("/openrouter/chat/completions")[0].bearer == SECRET

    browser.get(admin_server + "/admin/providers/provider/")
    assert "ok, 1 offer(s) seen" in browser.find_element(By.ID, "result_list").text
    browser.get(admin_server + "/admin/providers/upstreamkey/")
    row = browser.find_element(By.ID, "result_list").text
    assert "OK" in row and "8.50 USD" in row  # 10 - 1.5 credits, less the request


OPERATOR_PAGES = {
    "dashboard": "/admin/",
    "ledger-list": "/admin/billing/ledgerentry/",
    "ledger-entry": "/admin/billing/ledgerentry/{entry}/change/",
    "key-list": "/admin/providers/upstreamkey/",
    "key-page": "/admin/providers/upstreamkey/{key}/change/",
    "provider-list": "/admin/providers/provider/",
    "model-page": f"/admin/models/{MODEL}/",
}


def test_every_operator_page_fits_a_1400_px_window(
    admin_server, browser, operator, traffic, tmp_path
):
    entry = LedgerEntry.objects.filter(outcome=LedgerEntry.Outcome.OK).first()
    add_failover_attempts(
        entry,
        served_ms=entry.latency_ms,
        status_code=429,
        failure="rate_limited",
        error="HTTP 429: slow down",
        duration_ms=140,
    )
    LedgerEntry.objects.filter(pk=entry.pk).update(attempts=2, latency_ms=1834, ttfb_ms=412)
    key = UpstreamKey.objects.get(label="old")
    log_in(browser, admin_server)
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
    )
    shots = {}
    for name, path in OPERATOR_PAGES.items():
        browser.get(admin_server + path.format(entry=entry.pk, key=key.pk))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 1400, f"{name} is {width} px wide"
        shots[name] = tmp_path / f"{name}.png"
        browser.save_screenshot(str(shots[name]))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    if os.environ.get("KEYAOS_SCREENSHOTS") == "docs":
        DOCS.mkdir(exist_ok=True)
        for name, shot in shots.items():
            shutil.copy(shot, DOCS / f"{name}.png")
