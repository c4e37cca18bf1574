"""What a person sees in the MLflow UI: a persona's trace, opened in a real headless Chromium.

Needs Debian's ``chromium`` (``scripts/install-system-deps`` installs it) and the ``playwright`` Python
package (the ``test`` extra), which drives that browser: Playwright's own browser download is never used.
``GENAI_MLFLOW_SKIP_UI_TESTS=1`` skips the test on a machine without a browser.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest

import genai_mlflow
from genai_mlflow.setup import Handle
from tests.mlflow_stack import MlflowStack

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_SCRIPT = "scripts/install-system-deps"
SKIP_ENV = "GENAI_MLFLOW_SKIP_UI_TESTS"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "Plan a picnic in Lyon for Ada"
# The UI loads its code lazily and polls the server; this bounds each wait for a piece of the page.
UI_TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(os.environ.get(SKIP_ENV) == "1", reason=f"{SKIP_ENV}=1")


def test_a_persona_trace_shows_model_tokens_and_prompt(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack, persona_name: str, tmp_path: Path
):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run {INSTALL_SCRIPT} (as root) to install Debian's chromium, "
            f"or set {SKIP_ENV}=1 to skip this test"
        )
    from playwright.sync_api import expect, sync_playwright

    with genai_mlflow.persona(persona_name):
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
        )
    assert handle.flush(60)
    usage = answer.usage
    assert usage is not None
    reply = answer.choices[0].message.content
    assert reply

    mlflow = mlflow_env.client()
    experiment = mlflow.get_experiment_by_name(f"{persona_name}_{datetime.now(UTC):%Y-%m-%d}")
    assert experiment is not None
    [found] = mlflow.search_traces(locations=[experiment.experiment_id])
    trace_id = found.info.trace_id

    screenshot = tmp_path / "mlflow-ui.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # A first visit to the traces page shows a modal "Detect Issues" tip over the whole page:
            # whenever it is in the way, dismiss it as a person would, with its "Got it" button.
            page.add_locator_handler(page.get_by_role("button", name="Got it"), lambda button: button.click())
            try:
                page.goto(f"{mlflow_env.tracking_uri}/#/experiments/{experiment.experiment_id}/traces")
                row = page.get_by_role("row").filter(has_text=PROMPT)
                expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
                tokens_cell = row.get_by_role("cell").filter(has_text=re.compile(rf"^{usage.total_tokens}$"))
                expect(tokens_cell).to_be_visible(timeout=UI_TIMEOUT_MS)

                row.get_by_role("cell").filter(has_text=PROMPT).first.click()
                expect(page).to_have_url(
                    re.compile(rf"[?&]traceId={re.escape(trace_id)}(&|$)"), timeout=UI_TIMEOUT_MS
                )
                drawer = page.get_by_role("dialog").filter(has_text=PROMPT)
                expect(drawer).to_be_visible(timeout=UI_TIMEOUT_MS)
                expect(drawer).to_contain_text(answer.model, timeout=UI_TIMEOUT_MS)  # the span's model tag
                expect(drawer).to_contain_text(PROMPT)  # Inputs: the user message
                expect(drawer).to_contain_text(reply)  # Outputs: the assistant message
                header_tokens = drawer.get_by_text(f"{usage.total_tokens} tokens", exact=True).first
                expect(header_tokens).to_be_visible(timeout=UI_TIMEOUT_MS)

                # Input and output counts are in the token badge's hover card.
                header_tokens.hover()
                breakdown = page.get_by_role("heading", name="Usage breakdown").locator("xpath=..")
                expect(breakdown).to_be_visible(timeout=UI_TIMEOUT_MS)
                for label, value in (
                    ("Input tokens", usage.prompt_tokens),
                    ("Output tokens", usage.completion_tokens),
                    ("Total", usage.total_tokens),
                ):
                    expect(breakdown).to_contain_text(re.compile(rf"{label}\s*{value}(?!\d)"))
            except Exception as exc:
                try:
                    page.screenshot(path=str(screenshot))
                    exc.add_note(f"screenshot of the page: {screenshot} (at {page.url})")
                except Exception as shot_error:
                    exc.add_note(f"no screenshot: {shot_error!r}")
                raise
        finally:
            browser.close()
