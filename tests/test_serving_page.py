"""The web page in a real browser: headless Chromium (Debian's package, driven by Playwright)
loads the page, uploads a real GTSRB image and sees the right class, for a named task and auto.

The task is trained here in seconds: three GTSRB classes, 20 of their 35 x 35 training images
each, on timm's tiny test_efficientnet. The uploaded image is one of those training images, so
the task classifies it reliably (the test first checks that it does, on the model itself).
The task gets routing prototypes from the same images, as training computes them, so "auto"
routes as it does for a trained model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import require_data
from PIL import Image
from playwright.sync_api import sync_playwright

from piggyback import PiggybackModel, Predictor
from piggyback.backbones import create_backbone
from piggyback.preprocess import Preprocess
from piggyback.route_fit import fit_routing_profile
from piggyback.serving.app import ServeSettings, create_app
from piggyback.serving.server import running_server

CLASSES = ["stopp", "vorfahrt_gewaehren", "vorgeschrieben_rechts"]
PER_CLASS = 20
#: Where to keep the page's screenshot: `PIGGYBACK_SERVE_SCREENSHOT=docs/serve-page.png pytest
#: tests/test_serving_page.py` redraws the README's picture (default: the test's tmp folder).
SCREENSHOT_ENV = "PIGGYBACK_SERVE_SCREENSHOT"

pytestmark = pytest.mark.slow


def train_gtsrb_task(data: Path, weights: Path, directory: Path) -> Path:
    """A 3-class GTSRB task fitted to its 60 training images; saved to `directory`."""
    torch.manual_seed(0)
    backbone = create_backbone("timm:test_efficientnet", weights=weights)
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    state = model.add_task("gtsrb", len(CLASSES), class_names=CLASSES, seed=0)
    model.set_task("gtsrb")
    preprocess = Preprocess.from_data_config(backbone.data_config, 32)
    state.metadata.preprocess = preprocess.to_dict()
    transform = preprocess.transform()
    files = [
        (path, label)
        for label, name in enumerate(CLASSES)
        for path in sorted((data / "train" / name).glob("*.png"))[:PER_CLASS]
    ]
    x = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in files])
    y = torch.tensor([label for _, label in files])
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.95, f"the quick task fits only {accuracy:.0%} of its training images"
    state.routing = fit_routing_profile(model, [(x, y)], state.metadata.preprocess)  # for "auto"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Debian's chromium is not installed (make install installs it as root)"
        if os.environ.get("CI"):  # in CI a skipped browser test would prove nothing
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def test_page_uploads_a_real_image_and_shows_the_right_class(chromium, tiny_weights, tmp_path):
    data = require_data("gtsrb")
    model_dir = train_gtsrb_task(data, tiny_weights, tmp_path / "model")
    image = sorted((data / "train" / "stopp").glob("*.png"))[0]
    engine = Predictor.from_pretrained(model_dir, device="cpu")
    assert engine.predict([Image.open(image).convert("RGB")], ["gtsrb"], top_k=1)[0].top[0][0] == (
        "stopp"
    )
    app = create_app(engine, ServeSettings(max_batch_size=4, max_wait_ms=2))
    with running_server(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 760})
        page.goto(url + "/")
        page.wait_for_selector("#task option[value=gtsrb]", state="attached")
        page.set_input_files("#file", str(image))
        page.select_option("#task", "gtsrb")
        page.click("#go")
        result = page.wait_for_selector(".result[data-task=gtsrb]")
        assert result.inner_text().startswith("Task: gtsrb")
        assert page.inner_text(".result .bar .label") == "stopp"  # the first bar: top-1
        assert len(page.query_selector_all(".result .bar")) == 3  # top 5 clipped to 3 classes

        page.select_option("#task", "auto")
        page.click("#go")
        page.wait_for_selector(".result .routed")
        assert "chosen by auto routing" in page.inner_text(".result h2")
        assert page.inner_text(".result .bar .label") == "stopp"
        screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "serve-page.png")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert screenshot.stat().st_size > 10_000
