"""``textseg web`` in a real headless Chromium: a real server on 127.0.0.1, the real shipped model, real files.

The tests share one server and one browser tab and run in the order written (as a user would): open the demo
case and segment it, try an empty prompt, an unreadable upload and a damaged model (each must leave the segments
as they were), overlay the probability map and delete the segment, segment through a ``textseg serve`` worker
(``--server``), upload real files, and cancel a run on the last one. The expected segment comes from ``textseg
segment`` on the same case with the same model, run beside the page. The last two tests need no browser.

Chromium is Debian's ``chromium`` package (``make test`` installs it; ``$CHROMIUM`` names another binary).
``Benchmarks/web_screenshots.py`` takes the README's screenshots and times the page without a second run beside it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from testkit import assert_same_mask

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
WAIT_MS = 240_000  # a cold start on two busy cores: the worker loads torch and the model
BATCH = 4  # slices per forward pass in the page and in `textseg segment`, so that both compute alike
PANEL_WIDTH = 400  # the panel's width in pixels (TextSegWebApp's navigation drawer); the views lie right of it


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is missing: run `make system-packages` (Debian's chromium package) or set $CHROMIUM")
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A user models folder holding a damaged copy of the shipped model (bytes in its weights flipped)."""
    from TextSegLib.engine.catalogue import Catalogue
    from TextSegLib.evaluation.demo import DEMO_MODEL

    folder = tmp_path_factory.mktemp("web-models")
    damaged = folder / "damaged.safetensors"
    shutil.copyfile(Catalogue(folder).resolve(DEMO_MODEL), damaged)
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged.write_bytes(bytes(data))
    return folder


@pytest.fixture(scope="module")
def expected(models_dir, tmp_path_factory):
    """``textseg segment`` on the demo case with the demo model and prompt (started now, read when needed)."""
    from TextSegLib.evaluation.demo import DEFAULT_CASE, DEMO_MODEL, demo_case

    case = demo_case(DEFAULT_CASE)
    output = tmp_path_factory.mktemp("web-cli") / "demo.seg.nrrd"
    process = subprocess.Popen(
        [sys.executable, "-m", "TextSegLib", "--models-dir", str(models_dir), "segment", str(case["image"]),
         "-p", case["prompt"], "-m", DEMO_MODEL, "--batch-size", str(BATCH), "-o", str(output), "-q",
         "--probability"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_environment(), text=True)

    def result() -> Path:
        out, _ = process.communicate(timeout=WAIT_MS / 1000)
        assert process.returncode == 0, out
        return output

    yield result
    if process.poll() is None:
        process.kill()
        process.wait()


def _start(arguments: list[str], ready: str, log: Path) -> tuple[subprocess.Popen, str]:
    """Run ``textseg <arguments>``, its output to ``log``; return the process and the URL in its ``ready`` line."""
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "TextSegLib", *arguments], stdout=handle,
                                   stderr=subprocess.STDOUT, env=_environment())
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline and process.poll() is None:
        found = re.search(ready + r" (http://\S+)", log.read_text(errors="replace"))
        url = found.group(1) if found else time.sleep(0.2)
    assert url, log.read_text(errors="replace")[-3000:]
    return process, url


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(models_dir, expected, tmp_path_factory):
    """``textseg web`` on a free port of 127.0.0.1; yields its URL."""
    port = _free_port()
    process, url = _start(["--models-dir", str(models_dir), "web", "--port", str(port)], "TextSeg web:",
                          tmp_path_factory.mktemp("web-server") / "server.log")
    assert url == f"http://127.0.0.1:{port}/"
    yield url
    _stop(process)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(), args=["--headless=new", "--no-sandbox", "--disable-gpu",
                                               "--disable-dev-shm-usage"])
        tab = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        tab.set_default_timeout(WAIT_MS)
        tab.goto(server)
        tab.wait_for_selector("#textseg-demo")
        yield tab
        browser.close()


# ---------------------------------------------------------------------------------------------------- helpers


def _views(page) -> np.ndarray:
    """The slice and 3D views as RGB pixels ``(H, W, 3)``, once two screenshots in a row agree (rendering done)."""
    from PIL import Image

    previous = None
    deadline = time.monotonic() + 30
    while True:
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))[:, PANEL_WIDTH:].astype(int)
        if (previous is not None and np.array_equal(shot, previous)) or time.monotonic() > deadline:
            return shot
        previous = shot
        time.sleep(0.5)


def _changed(one: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Pixels that differ by more than JPEG noise between two views images."""
    return np.abs(one - other).sum(axis=2) > 60


def _views_once(page, condition, what: str) -> np.ndarray:
    """The views once ``condition(views)`` holds (the server renders after the click's round trip); fails saying
    ``what`` did not happen within a minute."""
    deadline = time.monotonic() + 60
    while not condition(shot := _views(page)):
        assert time.monotonic() < deadline, what
    return shot


def _wait_for_volume(page, volume) -> None:
    """Wait until the page names a volume of ``volume``'s size as loaded."""
    k, j, i = volume.array.shape
    page.wait_for_function(f"document.querySelector('#textseg-volume').textContent.includes('{i} x {j} x {k} ')")


def _choose_model(page, model_id: str) -> None:
    page.click("#textseg-model", force=True)  # the selected title lies over the input
    page.click(f".v-list-item:has-text('({model_id})')")


def _rows(page) -> list[str]:
    return [row.inner_text() for row in page.query_selector_all(".textseg-segment")]


def _message(page) -> str:
    alerts = page.query_selector_all("#textseg-message")
    assert len(alerts) == 1, f"{len(alerts)} messages shown"
    return alerts[0].inner_text()


def _wait_idle(page) -> None:
    page.wait_for_selector("#textseg-segment")


def _segment_colour(page) -> np.ndarray:
    colour = page.eval_on_selector(".textseg-color", "e => getComputedStyle(e).backgroundColor")
    return np.array([int(v) for v in re.findall(r"\d+", colour)[:3]])


def _segment_millilitres(path: Path) -> float:
    from TextSegLib.io.segnrrd import read_seg_nrrd

    segmentation = read_seg_nrrd(path)
    (segment,) = segmentation["segments"]
    voxels = np.count_nonzero(segmentation["voxels"] == segment["labelValue"])
    spacing = np.linalg.norm(np.asarray(segmentation["ijkToLPS"])[:3, :3], axis=0)
    return voxels * float(np.prod(spacing)) / 1000.0


def _listed_millilitres(row: str) -> float:
    return float(re.search(r"([0-9.]+) mL", row).group(1))


# ------------------------------------------------------------------------------------------------------ tests


def test_the_demo_case_segments_in_the_page_as_textseg_segment_does(page, expected, tmp_path):
    from TextSegLib.evaluation.demo import DEFAULT_CASE, demo_case
    from TextSegLib.io.segnrrd import read_seg_nrrd
    from TextSegLib.io.volumes import read_volume

    case = demo_case(DEFAULT_CASE)
    page.click("#textseg-demo")
    _wait_for_volume(page, read_volume(case["image"]))
    assert page.input_value("#textseg-prompt") == case["prompt"]
    assert _rows(page) == []
    before = _views(page)

    page.fill("#textseg-batch-size", str(BATCH))  # as the CLI run: bf16 results may differ between batch sizes
    page.click("#textseg-segment")
    page.wait_for_selector("#textseg-cancel")
    page.wait_for_selector("#textseg-progress")
    page.wait_for_selector(".textseg-segment")
    _wait_idle(page)
    after = _views_once(page, lambda shot: _changed(shot, before).sum() > 500, "the views do not change")

    reference = expected()
    (row,) = _rows(page)
    assert case["prompt"] in row
    assert _listed_millilitres(row) == pytest.approx(_segment_millilitres(reference), rel=1e-4)
    # The line the Slicer panel shows too (TextSegLib.app.mrml.describe_result): the liver is found.
    message = _message(page)
    assert re.fullmatch(rf"{re.escape(case['prompt'])}: \d+ voxels \(\d+\.\d\d mL\) in \d+\.\d s on [A-Z]+; found "
                        r"\(maximum probability \d\.\d\d, threshold \d\.\d\d\)\.( .+)?", message), message
    assert _listed_millilitres(message) == _listed_millilitres(row)

    # The views change where the segment is, towards its colour: hide it and compare.
    page.click(".textseg-visibility")
    page.wait_for_selector(".textseg-visibility .mdi-eye-off")
    hidden = _views_once(page, lambda shot: _changed(shot, after).sum() > 500, "hiding the segment changes nothing")
    assert not np.array_equal(before, after)
    changed = _changed(after, hidden)
    assert changed.sum() > 500, f"only {changed.sum()} pixels show the segment"
    towards = ((after - hidden)[changed] * (_segment_colour(page) - hidden[changed])).sum(axis=1) > 0
    assert towards.mean() > 0.9, f"{towards.mean():.2f} of the changed pixels move towards the segment's colour"
    page.click(".textseg-visibility")
    page.wait_for_selector(".textseg-visibility .mdi-eye")

    with page.expect_download() as download:
        page.click("#textseg-download")
    path = tmp_path / "web.seg.nrrd"
    download.value.save_as(path)
    assert download.value.suggested_filename == f"{case['case']}.seg.nrrd"
    web, cli = read_seg_nrrd(path), read_seg_nrrd(reference)
    (probability_file,) = reference.parent.glob("*.probability.nrrd")
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(probability_file))).transpose(2, 1, 0)  # slicerio: i, j, k
    # The page's worker and the CLI compute in two processes: a voxel within rounding of 0.5 may fall either side.
    most = max(1, int(1e-4 * np.count_nonzero(cli["voxels"])))
    assert_same_mask(web["voxels"], cli["voxels"], probability, most=most)
    np.testing.assert_allclose(web["ijkToLPS"], cli["ijkToLPS"])
    for mine, theirs in zip(web["segments"], cli["segments"], strict=True):
        for key in ("name", "color", "tags", "terminology", "labelValue"):
            assert mine.get(key) == theirs.get(key), key


def test_several_prompts_give_several_segments_and_a_repeated_prompt_replaces_its_own(page):
    from TextSegLib.evaluation.demo import DEFAULT_CASE, demo_case
    from TextSegLib.io.volumes import read_volume

    case = demo_case(DEFAULT_CASE)
    page.click("#textseg-demo")  # a new volume replaces the previous one and its segments
    _wait_for_volume(page, read_volume(case["image"]))
    page.wait_for_function("document.querySelectorAll('.textseg-segment').length === 0")
    prompts = [target["prompt"] for target in case["targets"][:2]]  # "the liver", "the spleen"
    for count, prompt in enumerate([*prompts, prompts[1]], start=1):
        page.fill("#textseg-prompt", prompt)
        page.click("#textseg-segment")
        page.wait_for_selector("#textseg-cancel")
        _wait_idle(page)
        page.wait_for_function(f"document.querySelector('#textseg-message')?.textContent.startsWith('{prompt}:')")
        rows = _rows(page)
        assert len(rows) == min(count, 2), rows
        assert prompt in rows[-1] if count <= 2 else any(prompt in row for row in rows)
    assert [sum(prompt in row for row in rows) for prompt in prompts] == [1, 1]
    page.locator(".textseg-delete").nth(1).click()  # leave one segment, as the tests below expect
    page.wait_for_function("document.querySelectorAll('.textseg-segment').length === 1")


def test_an_empty_prompt_is_one_message_and_changes_nothing(page):
    rows = _rows(page)
    page.fill("#textseg-prompt", "   ")
    page.click("#textseg-segment")
    page.wait_for_selector("#textseg-message:has-text('The prompt is empty')")
    assert "type what to segment" in _message(page)
    assert page.query_selector("#textseg-cancel") is None
    assert _rows(page) == rows


def test_an_unreadable_upload_is_one_message_and_changes_nothing(page, tmp_path):
    rows, volume = _rows(page), page.inner_text("#textseg-volume")
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: what\nthis is not a header\n\n\x00\x01")
    page.set_input_files("#textseg-upload", str(broken))
    page.wait_for_selector("#textseg-message:has-text('broken.nrrd')")
    message = _message(page)
    assert message.startswith("Cannot read 'broken.nrrd': it is not an image TextSeg can read"), message
    assert tempfile.gettempdir() not in message
    assert page.inner_text("#textseg-volume") == volume
    assert _rows(page) == rows


def test_a_damaged_model_is_one_message_and_changes_nothing(page):
    from TextSegLib.evaluation.demo import DEFAULT_CASE, DEMO_MODEL, demo_case

    rows = _rows(page)
    _choose_model(page, "damaged")
    page.fill("#textseg-prompt", demo_case(DEFAULT_CASE)["prompt"])
    page.click("#textseg-segment")
    page.wait_for_selector("#textseg-message:has-text('segments are as they were')")
    assert "damaged" in _message(page).lower()
    assert _rows(page) == rows
    _choose_model(page, DEMO_MODEL)


def test_the_probability_map_overlays_the_slices_and_delete_removes_the_segment(page):
    shown = _views(page)
    page.click(".textseg-probability")
    _views_once(page, lambda shot: _changed(shot, shown).mean() > 0.05, "the probability map does not cover the slices")
    page.click(".textseg-probability")
    _views_once(page, lambda shot: _changed(shot, shown).mean() < 0.01, "the probability map stays after it was hidden")
    page.click(".textseg-delete")
    page.wait_for_selector("text=No segments yet.")
    assert _rows(page) == []
    assert page.is_disabled("#textseg-download")
    _views_once(page, lambda shot: _changed(shot, shown).sum() > 500, "the deleted segment still shows")


def test_with_server_the_page_segments_on_a_textseg_serve_worker(page, expected, models_dir, tmp_path):
    """``textseg web --server``: the models and the segmentation come from a ``textseg serve`` with a token."""
    from TextSegLib.evaluation.demo import DEMO_MODEL

    token = "web-test-token"
    worker, worker_url = _start(["--models-dir", str(models_dir), "serve", "--port", "0", "--token", token,
                                 "--ready-line"], "TEXTSEG-WORKER-READY", tmp_path / "serve.log")
    try:
        web, url = _start(["web", "--port", str(_free_port()), "--server", worker_url, "--token", token],
                          "TextSeg web:", tmp_path / "web.log")
        try:
            tab = page.context.browser.new_page(viewport={"width": 1400, "height": 900})
            tab.set_default_timeout(WAIT_MS)
            tab.goto(url)
            tab.wait_for_selector(f"text=segments on the TextSeg server at {worker_url}")
            tab.click("#textseg-model", force=True)
            assert tab.is_visible(".v-list-item:has-text('(damaged)')")  # the server's catalogue, not this one's
            tab.click(f".v-list-item:has-text('({DEMO_MODEL})')")
            tab.click("#textseg-demo")
            tab.wait_for_function("document.querySelector('#textseg-volume').textContent.includes('voxels')")
            tab.click("#textseg-segment")
            tab.wait_for_selector(".textseg-segment")
            assert _listed_millilitres(_rows(tab)[0]) == pytest.approx(_segment_millilitres(expected()), rel=1e-4)
            tab.close()
        finally:
            _stop(web)
    finally:
        _stop(worker)


def test_an_unreachable_server_is_one_line_at_start():
    port = _free_port()  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "TextSegLib", "web", "--server", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, env=_environment(), timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith(f"textseg: error: Cannot reach the TextSeg server at http://127.0.0.1:{port}")
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("kind", ["zipped DICOM", "nrrd"])
def test_real_files_upload(page, tmp_path, kind):
    from TextSegLib.io.volumes import read_volume

    if kind == "nrrd":
        source = upload = SHARED / "pyradiomics" / "lung2_image.nrrd"
    else:
        source = SHARED / "totalsegmentator" / "ct_b_dicom"
        upload = tmp_path / "ct_b.zip"
        with zipfile.ZipFile(upload, "w") as archive:
            for file in sorted(source.iterdir()):
                archive.write(file, f"ct_b_dicom/{file.name}")
    page.set_input_files("#textseg-upload", str(upload))
    # The page may already show a volume of the same size (the demo case is patient B): wait for this upload's
    # message, then check the volume.
    loaded = f"Loaded {upload.name.split('.')[0]}"
    page.wait_for_function(f"(document.querySelector('#textseg-message') || {{}}).textContent?.includes('{loaded}')")
    _wait_for_volume(page, read_volume(source))
    assert loaded in _message(page)
    assert _rows(page) == []


def test_cancel_stops_the_run_and_keeps_the_segments(page):
    """On the uploaded lung2 (61 slices): one segment, then a run of one slice per batch cancelled mid-way."""
    page.fill("#textseg-prompt", "the left lung")
    page.click("#textseg-segment")
    page.wait_for_selector(".textseg-segment")
    _wait_idle(page)
    rows = _rows(page)
    page.fill("#textseg-prompt", "the right lung")
    page.fill("#textseg-batch-size", "1")
    page.click("#textseg-segment")
    page.wait_for_function("/Segmenting: [1-9][0-9]* of 61/.test(document.body.innerText)")
    page.click("#textseg-cancel")
    _wait_idle(page)
    assert "Cancelled" in _message(page)
    assert _rows(page) == rows
    page.fill("#textseg-batch-size", "")


def test_uploads_that_are_not_zipped_dicom_series_are_refused_in_one_line():
    """Without a browser: what the page says for zip files it cannot use."""
    from TextSegLib.app.uploads import read_upload
    from TextSegLib.io.volumes import VolumeError

    with pytest.raises(VolumeError, match=r"^'x\.zip' is not a readable zip file .*; upload NRRD"):
        read_upload("x.zip", b"PK but not a zip")
    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr("../escaped.dcm", b"DICM")
    with pytest.raises(VolumeError, match="outside its folder"):
        read_upload("evil.zip", escaping.getvalue())
    text = io.BytesIO()
    with zipfile.ZipFile(text, "w") as archive:
        archive.writestr("notes/readme.txt", "not an image")
    with pytest.raises(VolumeError, match=r"^No DICOM series found in the folder 'notes\.zip'"):
        read_upload("notes.zip", text.getvalue())
    # Zip files Python cannot unpack, marked so in both of a member's headers as a zip tool marks them.
    with pytest.raises(VolumeError, match=r"^'locked\.zip' is encrypted; zip the DICOM folder without a password\.$"):
        read_upload("locked.zip", _zip_with(encrypted=True))
    with pytest.raises(VolumeError, match=r"^'odd\.zip' is not a readable zip file \(That compression method is not "
                                          r"supported\)"):
        read_upload("odd.zip", _zip_with(method=99))


def _zip_with(encrypted: bool = False, method: int | None = None) -> bytes:
    """A zip of one DICOM-named file whose local and central headers say it is encrypted or use ``method``."""
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("series/slice.dcm", b"DICM" * 100)
    data = bytearray(packed.getvalue())
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the method follows the flags
        at = data.find(signature) + flags
        if encrypted:
            data[at] |= 1
        if method is not None:
            data[at + 2:at + 4] = method.to_bytes(2, "little")
    return bytes(data)


def test_a_volume_shown_in_the_scene_is_the_volume_read():
    """``volume_to_node`` (what the page shows) gives back, through ``volume_from_node`` (what the Slicer module
    sends to the worker), the voxels and geometry ``read_volume`` read, also for a file whose axes are not LPS."""
    import slicer

    from TextSegLib.app.mrml import volume_from_node, volume_to_node
    from TextSegLib.io.volumes import read_volume

    scene = slicer.vtkMRMLScene()
    for path in (SHARED / "pyradiomics" / "lung2_image.nrrd", SHARED / "totalsegmentator" / "ct_a_image.nii.gz"):
        volume = read_volume(path)
        back = volume_from_node(volume_to_node(volume, scene, path.name))
        np.testing.assert_array_equal(back.array, volume.array)
        np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
        np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
        np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
