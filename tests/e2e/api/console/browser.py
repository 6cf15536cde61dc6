"""The web console in headless Chromium (Debian's package), driven by Playwright.

Starts a test failover from the fleet view (readiness shown first), watches the job page reach
"testing" with its auto-cleanup countdown, ends it and sees it complete; cancels another during
its hold and sees the rollback; checks the jobs list's filter, a phone-sized screen, the
keyboard, that a viewer sees no action buttons, and that no page logs an error. Saves
screenshots of the fleet view and a job page.

Usage: browser.py CONFIG_JSON, where CONFIG_JSON is {"base": URL, "auth_base": URL, "tokens":
{"viewer": T, "operator": T}, "vms": {"test": ID, "cancel": ID}, "screenshots": DIR}.
"""
import json
import os
import sys

import requests
from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("TERN_CHROMIUM", "/usr/bin/chromium")
LONG = 90_000


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


def watch_errors(page, errors):
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))


def start_from_fleet(page, base, vm):
    page.goto(f"{base}/#/")
    row = page.locator(f'tr[data-vm="{vm}"]')
    expect(row).to_be_visible()
    expect(row.locator('td.readiness .badge[data-status="pass"]')).to_be_visible(timeout=LONG)
    row.locator('[data-action="test-failover"]').click()
    dialog = page.locator("dialog#dialog")
    expect(dialog).to_be_visible()
    # The readiness report comes first.
    expect(dialog.locator("#readiness tr")).to_have_count(5)
    expect(dialog.locator("#readiness-score")).to_have_text("100%")
    dialog.locator("#duration").fill("10m")
    dialog.locator("#dialog-ok").click()
    page.wait_for_url("**/#/jobs/*")
    job = page.url.split("#/jobs/")[1]
    expect(page.locator('h1 .badge[data-status="testing"]')).to_be_visible(timeout=LONG)
    return job


def main(config):
    base, vms, shots = config["base"], config["vms"], config["screenshots"]
    os.makedirs(shots, exist_ok=True)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        watch_errors(page, errors)

        # A test failover from the fleet view: testing, its countdown, end, completed.
        job = start_from_fleet(page, base, vms["test"])
        expect(page.locator("#countdown")).to_contain_text("auto-cleanup in")
        expect(page.locator('#timeline li[data-phase="forward"][data-status="completed"]').first).to_be_visible(timeout=LONG)
        expect(page.locator("#journal div").first).to_be_visible()
        page.screenshot(path=f"{shots}/job.png", full_page=True)
        page.locator('[data-action="end-test"]').click()
        expect(page.locator('h1 .badge[data-status="completed"]')).to_be_visible(timeout=LONG)
        expect(page.locator('#timeline li[data-phase="teardown"][data-status="completed"]').first).to_be_visible()
        check(page.locator('[data-action]').count() == 0, "a finished job offers no action")
        print(f"console: test failover {job} started from the fleet, ended, completed")

        # Another, cancelled during its hold: the rollback.
        job = start_from_fleet(page, base, vms["cancel"])
        page.locator('[data-action="cancel"]').click()
        page.locator("#cancel-reason").fill("browser test: cancel during the hold")
        page.locator("#dialog-ok").click()
        expect(page.locator('h1 .badge[data-status="cancelled"]')).to_be_visible(timeout=LONG)
        rollback = page.locator('#timeline li[data-phase="rollback"]')
        expect(rollback.first).to_be_visible()
        check(rollback.count() == page.locator('#timeline li[data-phase="rollback"][data-status="completed"]').count(),
              "every rollback step completed")
        print(f"console: {job} cancelled, {rollback.count()} rollback steps completed")

        # The fleet and the jobs list.
        page.goto(f"{base}/#/")
        expect(page.locator("table#fleet tbody tr")).to_have_count(len(requests.get(f"{base}/api/v1/vms?page_size=100").json()["data"]))
        expect(page.locator('.counts .badge[data-status="completed"]')).to_be_visible()
        expect(page.locator('td.readiness .badge[data-status="pass"]')).to_have_count(page.locator("table#fleet tbody tr").count(), timeout=LONG)
        check("null" not in page.locator("main").inner_text(), "no stray text")
        page.screenshot(path=f"{shots}/fleet.png", full_page=True)
        page.goto(f"{base}/#/jobs?status=cancelled")
        expect(page.locator("table#jobs tbody tr")).to_have_count(1)
        page.locator("#f-status").select_option("completed")
        page.locator(".filters button").click()
        expect(page.locator("table#jobs tbody tr")).to_have_count(1)
        expect(page.locator('table#jobs .badge[data-status="completed"]')).to_be_visible()

        # The keyboard: Tab reaches a VM's action, Enter opens its dialog, Escape closes it.
        page.goto(f"{base}/#/")
        expect(page.locator('[data-action="test-failover"]').first).to_be_visible()
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.dataset.action") == "test-failover":
                break
        check(page.evaluate("document.activeElement.dataset.action") == "test-failover", "Tab reaches the action")
        page.keyboard.press("Enter")
        expect(page.locator("dialog#dialog")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("dialog#dialog")).to_be_hidden()

        # A phone-sized screen: nothing wider than the screen.
        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        watch_errors(phone, errors)
        for view in ("#/", f"#/jobs/{job}", "#/jobs"):
            phone.goto(f"{base}/{view}")
            phone.wait_for_selector("main h1")
            width = phone.evaluate("document.documentElement.scrollWidth")
            check(width <= 390, f"{view} fits a phone: {width}px wide")
        phone.close()
        print("console: jobs filter, keyboard, phone-sized screen")

        # A viewer: everything shown, no action offered.
        auth = config["auth_base"]
        operator = {"Authorization": f"Bearer {config['tokens']['operator']}"}
        started = requests.post(f"{auth}/api/v1/failover/test", headers=operator, timeout=30,
                                json={"vm_id": vms["test"], "test_duration": "10m", "auto_cleanup": True}).json()
        check(started["success"], started)
        viewer = browser.new_context(viewport={"width": 1280, "height": 860})
        viewer.add_init_script(f"localStorage.setItem('tern.token', {json.dumps(config['tokens']['viewer'])})")
        vpage = viewer.new_page()
        watch_errors(vpage, errors)
        vpage.goto(f"{auth}/#/")
        expect(vpage.locator("#who")).to_contain_text("(viewer)")
        expect(vpage.locator("table#fleet tbody tr").first).to_be_visible()
        vpage.goto(f"{auth}/#/jobs/{started['job_id']}")
        expect(vpage.locator("h1 .badge")).to_be_visible()
        expect(vpage.locator("#timeline li").first).to_be_visible(timeout=LONG)
        check(vpage.locator("[data-action]").count() == 0, "a viewer sees no action buttons")
        vpage.goto(f"{auth}/#/")
        expect(vpage.locator("table#fleet tbody tr").first).to_be_visible()
        check(vpage.locator("[data-action]").count() == 0, "a viewer sees no action buttons on the fleet")
        requests.delete(f"{auth}/api/v1/failover/test/{started['job_id']}", headers=operator, timeout=30)
        print("console: a viewer sees the fleet and a job, and no action")
        browser.close()
    check(not errors, f"no console errors: {errors}")
    print("console: all checks passed, no console errors")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
