"""The demo in a real browser: for every modality whose extra is installed, a tiny training run, the
page served on a free port, a prompt typed (image, video) or picked (the others), Compare clicked in
headless Chromium (Playwright), and both outputs and the scores checked as rendered; a screenshot per
modality goes to $MMGRPO_DEMO_SCREENSHOTS (default: a pytest temporary folder).

Needs playwright (extra `demo`) and a Chromium on PATH (Debian/Ubuntu: apt-get install chromium;
Playwright's own browser download is not used). Without them the test skips, saying so; with
MMGRPO_REQUIRE_BROWSER=1 (CI sets it) it fails instead.
"""

import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from mmgrpo.config import ConfigError, available_modalities

REQUIRE = os.environ.get("MMGRPO_REQUIRE_BROWSER", "").strip() not in ("", "0")
TINY = ["train.checkpoint_every=2", "eval.num_prompts=2", "eval.batch_size=2", "train.num_threads=1",
        "train.prompts_per_step=2", "train.group_size=4", "eval.gallery=2"]
EMBEDDED = ("toy", "image", "video", "vlm", "audio", "mdlm")  # modalities whose shipped config runs offline
TYPED = {"image": "a red circle", "video": "a red circle moving right"}  # mini-world captions: scored
LOADED_IMAGES = "(sel) => { const i = document.querySelectorAll(sel); return i.length > 0 && " \
                "Array.from(i).every(x => x.complete && x.naturalWidth > 0); }"
PLAYING_VIDEO = "(sel) => { const v = document.querySelector(sel); return v && v.readyState >= 2 && v.videoWidth > 0; }"


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _unavailable() -> str | None:
    problems = []
    for module in ("playwright", "gradio"):
        try:
            __import__(module)
        except ImportError:
            problems.append(f"{module} is not installed (pip install 'mmgrpo[demo]')")
    if chromium() is None:
        problems.append("no Chromium on PATH (Debian/Ubuntu: apt-get install chromium)")
    if not problems:
        return None
    return f"the browser test needs: {'; '.join(problems)}. Set MMGRPO_REQUIRE_BROWSER=1 to fail instead of skip"


@pytest.fixture(scope="module")
def browser():
    reason = _unavailable()
    if reason:
        pytest.fail(reason) if REQUIRE else pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        args = ["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]  # root needs no sandbox
        browser = p.chromium.launch(executable_path=chromium(), args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("MMGRPO_DEMO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(modality: str, out: Path) -> Path:
    from mmgrpo.trainer import train

    try:
        train(modality, out=out, overrides=TINY, max_steps=2, progress=False)
    except ConfigError as e:
        if "needs the package" in str(e):  # this modality's extra is not installed here
            pytest.skip(f"{modality}: {e}")
        raise
    return out


def _long_wav(path: Path) -> Path:
    import soundfile as sf

    sf.write(str(path), 0.2 * np.sin(np.linspace(0, 6000, 3 * 44100, dtype=np.float32)), 44100)
    return path


def _stereo_wav(path: Path) -> Path:
    import soundfile as sf

    tone = 0.2 * np.sin(np.linspace(0, 800, 16000, dtype=np.float32))
    sf.write(str(path), np.stack([tone, tone], 1), 16000)
    return path


@pytest.mark.parametrize("modality", [m for m in EMBEDDED if m in available_modalities()])
def test_compare_in_the_browser(modality, browser, screenshots, tmp_path):
    run = tiny_run(modality, tmp_path / modality)
    from mmgrpo.demo import launch
    from mmgrpo.demo.views import view_kind

    kind = view_kind(modality)
    demo = launch(run, port=free_port(), block=False)
    try:
        assert demo.server_name == "127.0.0.1"  # this machine only, unless --host says otherwise
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo.local_url)
        page.wait_for_selector("#mm-compare", timeout=60_000)
        if modality in TYPED:
            page.fill("#mm-prompt textarea", TYPED[modality])
        page.click("#mm-compare")
        page.wait_for_selector("#mm-scores", timeout=120_000)
        check_outputs(page, kind, demo.local_url)
        scores = page.inner_text("#mm-scores")
        assert "trained - base" in scores and re.search(r"\d", scores)
        for name in _reward_names(run):
            assert name in scores
        page.screenshot(path=str(screenshots / f"demo-{modality}.png"), full_page=True)

        # bad input: a visible message, and the server keeps serving
        if kind == "audio":
            page.set_input_files("#mm-upload input[type=file]", str(_stereo_wav(tmp_path / "stereo.wav")))
            page.wait_for_timeout(1000)
            needle = "2 channels"
        else:
            page.fill("#mm-prompt textarea", "   ")
            needle = "the prompt is empty"
        page.click("#mm-compare")
        page.wait_for_function("(t) => document.querySelector('#mm-message').innerText.includes(t)", arg=needle,
                               timeout=60_000)
        assert page.request.get(demo.local_url).status == 200
        if kind == "audio":  # the user's own recording: another rate and longer than the model takes
            page.click("#mm-upload button[aria-label='Clear']")
            page.set_input_files("#mm-upload input[type=file]", str(_long_wav(tmp_path / "long.wav")))
            page.wait_for_timeout(1000)
            page.click("#mm-compare")
            page.wait_for_function("() => /resampled.*were enhanced/.test(document.querySelector('#mm-message')"
                                   ".innerText)", timeout=60_000)
            assert "your file long.wav" not in page.inner_text("#mm-message")  # a note, not an error
        outside = tmp_path / "outside.txt"
        outside.write_text("not to be served")
        for path in (outside, Path(__file__).resolve()):  # a temporary file elsewhere, the working tree
            assert page.request.get(f"{demo.local_url}gradio_api/file={path}").status == 403
        page.close()
    finally:
        demo.close()


def _reward_names(run: Path) -> list[str]:
    import yaml

    return [r["name"].rpartition(":")[2] for r in yaml.safe_load((run / "config.yaml").read_text())["rewards"]]


def check_outputs(page, kind: str, url: str) -> None:
    """Both policies' outputs rendered: pictures decoded, videos playable, WAVs served, text shown."""
    wait = {"timeout": 60_000}
    if kind in ("text", "mdlm"):
        for side in ("base", "trained"):
            assert page.inner_text(f"#mm-{side}-text").startswith(side)
    elif kind == "image":
        for selector in ("#mm-slider img", "#mm-base img", "#mm-trained img"):
            page.wait_for_function(LOADED_IMAGES, arg=selector, **wait)
        assert page.locator("#mm-slider img").count() >= 2
    elif kind == "video":
        for side in ("base", "trained"):
            page.wait_for_function(PLAYING_VIDEO, arg=f"#mm-{side} video", **wait)
            page.wait_for_function(LOADED_IMAGES, arg=f"#mm-{side}-sheets img", **wait)
        page.evaluate("document.querySelector('#mm-base video').play()")  # the players are synced
        page.wait_for_function("() => !document.querySelector('#mm-trained video').paused", **wait)
        page.evaluate("document.querySelector('#mm-trained video').pause()")
        page.wait_for_function("() => document.querySelector('#mm-base video').paused", **wait)
    elif kind == "audio":
        for side in ("noisy", "base", "trained"):
            link = page.locator(f"#mm-{side} a[href$='.wav']").first
            link.wait_for(state="attached", **wait)
            response = page.request.get(link.get_attribute("href"))
            assert response.status == 200 and response.body()[:4] == b"RIFF"
            page.wait_for_function("(s) => /0:0[1-9]/.test(document.querySelector(s).innerText)",
                                   arg=f"#mm-{side}", **wait)  # the player read the clip's duration
        for selector in ("#mm-noisy-spec img", "#mm-base-spec img", "#mm-trained-spec img"):
            page.wait_for_function(LOADED_IMAGES, arg=selector, **wait)
    elif kind == "vlm":
        page.wait_for_function(LOADED_IMAGES, arg="#mm-overlay img", **wait)
        for side in ("base", "trained"):
            assert page.inner_text(f"#mm-{side}-text").startswith(side)
