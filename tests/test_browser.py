"""The web chat and dashboard in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os

import pytest
import pytest_asyncio

from bot.runtime import services
from tests.serving import serving
from tuneloop.config import parse

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"no Chromium at {CHROMIUM} (`make browser` or apt-get install chromium)"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    config = parse({"model": {"base": str(tiny_model), "device": "cpu", "max_new_tokens": 40},
                    "storage": {"path": str(d / "tuneloop.db")}, "trainer": {"enabled": False}}, d)
    async with services(config) as svc, serving(svc) as base:
        yield base, svc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser):
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    yield page
    await context.close()


async def send(page, text: str):
    """Type a message, press Enter, wait for the reply's feedback buttons; the reply bubble."""
    before = await page.locator(".msg.bot[data-exchange-id]").count()
    await page.fill("#input", text)
    await page.press("#input", "Enter")
    bubble = page.locator(".msg.bot[data-exchange-id]").nth(before)
    await bubble.wait_for(timeout=30_000)
    return bubble


async def test_chat_stream_rate_correct(server, page):
    base, svc = server
    await page.goto(base + "/")
    user = await page.input_value("#user")
    assert user.startswith("guest-")
    assert await page.evaluate("localStorage.getItem('tuneloop.user')") == user
    # Count the reply's text updates: a streamed reply arrives in pieces.
    await page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver((records) => {
            for (const r of records) if (r.target.closest && r.target.closest('.msg.bot')) window.updates++;
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    bubble = await send(page, "hello")
    exchange_id = int(await bubble.get_attribute("data-exchange-id"))
    ex = svc.store.exchange(exchange_id)
    assert await bubble.locator(".text").inner_text() == ex.reply.strip() or ex.reply == ""
    assert await page.evaluate("window.updates") >= 3
    assert (ex.platform, ex.user, ex.prompt) == ("web", user, "hello")

    # 👎 lands in the database as this user's rating.
    await bubble.locator("button.rate-down").click()
    await bubble.locator("button.rate-down.on").wait_for()
    assert svc.store.ratings(exchange_id) == {user: "down"}
    # A better reply.
    await bubble.locator("button.fix-toggle").click()
    await bubble.locator(".fix textarea").fill("Hello! How can I help?")
    await bubble.locator("button.fix-send").click()
    await bubble.locator(".status", has_text="correction saved").wait_for()
    assert [c["text"] for c in svc.store.corrections(exchange_id)] == ["Hello! How can I help?"]

    # The same conversation carries on; a new one starts clean.
    second = await send(page, "how are you?")
    ex2 = svc.store.exchange(int(await second.get_attribute("data-exchange-id")))
    assert ex2.conversation_id == ex.conversation_id
    assert ex2.messages[-3:-1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ex.reply}]
    await page.click("#new")
    assert await page.locator(".msg").count() == 0
    third = await send(page, "hello again")
    ex3 = svc.store.exchange(int(await third.get_attribute("data-exchange-id")))
    assert ex3.conversation_id != ex.conversation_id
    # 👍 then 👍 again removes the rating.
    await third.locator("button.rate-up").click()
    await third.locator("button.rate-up.on").wait_for()
    assert svc.store.ratings(ex3.id) == {user: "up"}
    await third.locator("button.rate-up").click()
    await third.locator(".status", has_text="rating removed").wait_for()
    assert svc.store.ratings(ex3.id) == {}
    assert page.errors == []


async def test_user_name_is_kept(server, page):
    base, svc = server
    await page.goto(base + "/")
    await page.fill("#user", "erin")
    await page.press("#user", "Tab")
    await page.reload()
    assert await page.input_value("#user") == "erin"
    bubble = await send(page, "hi")
    assert svc.store.exchange(int(await bubble.get_attribute("data-exchange-id"))).user == "erin"


async def test_error_is_shown(server, page):
    base, svc = server
    await page.goto(base + "/")
    await page.fill("#input", "x" * (svc.config.model.max_input_chars + 1))
    await page.press("#input", "Enter")
    await page.locator(".msg.error", has_text="max_input_chars").wait_for(timeout=10_000)


async def test_dashboard_draws(server, page):
    base, svc = server
    await page.goto(base + "/dashboard")
    await page.locator("#totals .figure").first.wait_for()
    total = svc.store.stats()["exchanges"]
    assert total > 0
    assert await page.locator("#totals .figure b").first.inner_text() == str(total)
    assert await page.locator("#chart-exchanges rect").count() >= 1
    assert await page.locator("#chart-versions rect").count() >= 1
    await page.locator("#corrections tr td", has_text="Hello! How can I help?").wait_for()
    await page.locator("#engine .figure", has_text="decode step").wait_for()
    await page.locator("#engine .figure", has_text="shared beginnings reused").wait_for()  # the prefix cache
    # The live load chart fills in after a few polls.
    await page.locator("#chart-load path").first.wait_for(timeout=10_000)
    assert page.errors == []


async def test_dashboard_load_chart_uses_the_page_clock(server, browser):
    """The load chart's time axis reads like "updated ...": the same local clock, hours included."""
    import re

    base, _ = server
    # Far from UTC, in a 12-hour locale: another clock or a minutes:seconds axis cannot pass.
    context = await browser.new_context(locale="en-US", timezone_id="Pacific/Chatham")
    try:
        page = await context.new_page()
        await page.goto(base + "/dashboard")
        # An idle engine draws a flat line, which has no height: attached, not "visible".
        await page.locator("#chart-load path").first.wait_for(state="attached", timeout=10_000)
        labels = await page.locator('#chart-load text[text-anchor="middle"]').all_text_contents()
        updated = (await page.locator("#updated").inner_text()).removeprefix("updated ")
    finally:
        await context.close()
    clock = re.compile(r"(\d{1,2}):(\d{2}):(\d{2})\s?([AP]M)")

    def seconds(text: str) -> int:
        m = clock.fullmatch(text.strip())
        assert m, f"{text!r} is not a time of day like {updated!r}"
        h, mi, s, half = int(m[1]) % 12, int(m[2]), int(m[3]), m[4]
        return (h + (12 if half == "PM" else 0)) * 3600 + mi * 60 + s

    assert labels
    now = seconds(updated)
    # Every point was drawn at most the chart's three minutes before the last update.
    assert all(0 <= (now - seconds(label)) % 86400 <= 180 for label in labels), (labels, updated)


async def test_dashboard_review_buttons(server, page):
    """A correction waiting for review is approved, another rejected, by clicking the dashboard's buttons."""
    base, svc = server

    def waiting(prompt: str, text: str) -> int:
        ex = svc.store.add_exchange(platform="api", user="mallory", conversation_id=f"api-{prompt}",
                                    messages=[{"role": "user", "content": prompt}], prompt=prompt,
                                    reply="no idea", model_version="base", community="http:acme")
        # Through a non-admin HTTP key's channel: it waits for review.
        decision = svc.feedback.correct(ex.id, "mallory", text, platform="api", community="http:acme",
                                        channel="http")
        assert decision.status == "pending"
        return decision.correction_id

    keep, drop = waiting("capital of atlantis", "Poseidonia"), waiting("best editor", "ed")
    await page.goto(base + "/dashboard")
    row = page.locator(f'#review-queue tr[data-correction-id="{keep}"]')
    await row.wait_for()
    assert "Poseidonia" in await row.inner_text() and "http:acme" in await row.inner_text()

    await row.locator("button.approve").click()
    await page.locator("#review-status", has_text=f"correction {keep} approved").wait_for()
    assert svc.store.correction(keep)["status"] == "live"
    assert await row.count() == 0
    other = page.locator(f'#review-queue tr[data-correction-id="{drop}"]')
    await other.locator("button.reject").click()
    await page.locator("#review-status", has_text=f"correction {drop} rejected").wait_for()
    assert svc.store.correction(drop)["status"] == "rejected"
    # The next poll finds the queue empty and says so.
    await page.locator("#review-queue td", has_text="nothing waits for review").wait_for(timeout=10_000)
    assert page.errors == []
