"""``textseg web``: TextSeg in a web browser, with 3D Slicer's slice and 3D views (trame-slicer).

The page shows Slicer's axial, sagittal and coronal slice views and a 3D view, rendered on the server by the MRML
displayable managers of ``slicer-core`` (through ``trame-slicer``) and streamed to the browser as images, beside a
panel: load a volume (an uploaded NRRD, NIfTI, MHA or zipped DICOM series, or the bundled demo case), pick a model,
type a prompt, press **Segment**, and download the segments as ``.seg.nrrd``.

Nothing here computes a segmentation or writes a segment: the volume is read with :func:`TextSegLib.io.volumes.
read_volume` (what ``textseg segment`` reads), sent to a TextSeg worker (:mod:`TextSegLib.service.protocol`: a worker
process on this computer, or a ``textseg serve`` server given with ``--server``), and its result is put into the
scene with :func:`TextSegLib.app.mrml.store_result` and written with :func:`TextSegLib.io.segnrrd.
write_seg_nrrd`, as the Slicer module and the CLI do. The networks never run in this process: the page, its
event loop and the rendering stay responsive while a volume is segmented, **Cancel** stops the worker's job before
its next batch of slices, and a worker that crashes or runs out of memory does not take the page down.

The application serves one scene: every browser tab connected to it shows and edits the same volume and segments
(as one Slicer window would). It has no log-in; see the README before binding it to another address than
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from TextSegLib.app.uploads import UPLOAD_KINDS, read_upload
from TextSegLib.app.web_layout import build_layout
from TextSegLib.core.errors import TextSegError, TextSegValueError
from TextSegLib.core.messages import describe_fault, first_line
from TextSegLib.core.options import DEVICES, SegmentOptions, check_batch_size, check_threshold
from TextSegLib.core.results import SegmentationResult
from TextSegLib.core.settings import DEFAULT_HOST, MODELS_DIR_VARIABLE, WEB_PORT, is_loopback
from TextSegLib.io.volumes import Volume, VolumeError, case_name, read_volume

__all__ = [
    "WINDOW_PRESETS",
    "TextSegWebApp",
    "serve_web",
]

log = logging.getLogger("textseg")

POLL_SECONDS = 0.2
# Window and level (Hounsfield units for CT) of the slice views; "Automatic" is Slicer's automatic window.
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "Automatic": None,
    "CT abdomen (W 400, L 40)": (400.0, 40.0),
    "CT lung (W 1500, L -600)": (1500.0, -600.0),
    "CT bone (W 2000, L 400)": (2000.0, 400.0),
    "Brain (W 80, L 40)": (80.0, 40.0),
}


# ---------------------------------------------------------------------------------------------- application


class TextSegWebApp:
    """The trame application: a Slicer scene with its views (trame-slicer) and TextSeg's panel.

    Args:
        server: a trame server (``trame.app.get_server(client_type="vue3")``).
        worker: the worker that segments (a :class:`~TextSegLib.service.local.LocalWorker` or
            :class:`~TextSegLib.service.client.RemoteWorker`).
        models: the models a user can pick (``ModelChoice`` list).
        default_model: the model chosen when the page opens (when it is among ``models``).
    """

    def __init__(self, server, worker, models: list, default_model: str = "") -> None:
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.server = server
        self.state = server.state
        self.worker = worker
        self.models = {model.id: model for model in models}
        # One thread talks to the worker, so that calls (start, upload, poll, cancel) never overlap.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textseg-worker")
        server.enable_module(trame_slicer_module)  # its chunked file upload

        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")

        self.volume: Volume | None = None
        self.volume_node = None
        self.segmentation_node = None
        self.probability_node = None
        self.segments: dict[str, SegmentationResult] = {}  # segment ID -> the result it came from
        self.case_number = 0
        self.job = None
        self.task: asyncio.Future | None = None
        self.cancel_requested = False
        self.upload_parts: list[dict] = []

        first = default_model if default_model in self.models else next(iter(self.models), "")
        self.state.update({
            "trame__title": "TextSeg",
            "models": [{"id": m.id, "title": m.title if m.title == m.id else f"{m.title} ({m.id})"} for m in models],
            "model_id": first,
            "prompt": "",
            "segment_name": "",
            "devices": list(DEVICES),
            "device": "auto",
            "threshold": "",
            "batch_size": "",
            "window_presets": list(WINDOW_PRESETS),
            "window_preset": "Automatic",
            "volume_name": "",
            "running": False,
            "cancelling": False,
            "progress": 0,
            "progress_text": "",
            "message": "",
            "message_type": "info",
            "segments": [],
            "probability_shown": "",
            "download_name": "segments.seg.nrrd",
            "where": worker.describe(),
        })
        self._describe_model(first)
        self.state.change("model_id")(lambda model_id, **_: self._describe_model(model_id))
        self.state.change("window_preset")(lambda window_preset, **_: self._apply_window(window_preset))
        self.ui = build_layout(self)

    # ------------------------------------------------------------------------------------------------ state

    def _say_fault(self, error: Exception, after: str = "") -> None:
        """A fault in TextSeg or a library under it (not the user's problem): its traceback in the log, one line in
        the page, and the page keeps working."""
        log.error("Unexpected error in the web page", exc_info=error)
        self._say(f"Unexpected {describe_fault(error)} (a fault in TextSeg; its traceback is in the log).{after}",
                  "error")

    def _say_error(self, error: Exception) -> None:
        """Say why something the user asked for failed: a :class:`TextSegError` in its one line, anything else as
        a fault."""
        if isinstance(error, TextSegError):
            self._say(first_line(error), "error")
        else:
            self._say_fault(error)

    def _say(self, text: str, kind: str = "info") -> None:
        self.state.message = text
        self.state.message_type = kind

    def _describe_model(self, model_id: str) -> None:
        model = self.models.get(model_id)
        self.state.model_description = model.description if model else ""
        self.state.model_examples = list(model.example_prompts) if model else []
        self.state.model_text_role = model.text_role if model else ""
        self.state.model_threshold = model.threshold if model else 0.5

    def _apply_window(self, preset: str) -> None:
        display = self.volume_node.GetDisplayNode() if self.volume_node is not None else None
        if display is None:
            return
        window = WINDOW_PRESETS.get(preset)
        if window is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*window)

    def _refresh_segments(self) -> None:
        from TextSegLib.app.mrml import segment_tag
        from TextSegLib.io.segnrrd import TAG_PROMPT

        rows = []
        if self.segmentation_node is not None:
            segmentation = self.segmentation_node.GetSegmentation()
            display = self.segmentation_node.GetDisplayNode()
            for number in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(number)
                segment = segmentation.GetNthSegment(number)
                red, green, blue = (round(255 * c) for c in segment.GetColor())
                kept = self.segments.get(segment_id)
                rows.append({
                    "id": segment_id,
                    "name": segment.GetName(),
                    "color": f"#{red:02x}{green:02x}{blue:02x}",
                    "ml": f"{kept.volume_ml:.2f} mL" if kept else "",
                    "prompt": segment_tag(segment, TAG_PROMPT) or "",
                    "visible": bool(display.GetSegmentVisibility(segment_id)) if display else True,
                    "probability": bool(kept and kept.probability is not None),
                })
        self.state.segments = rows

    # ------------------------------------------------------------------------------------------------ volume

    def open_demo(self) -> None:
        """Load the bundled demo case (the one ``textseg demo`` segments) and put its first prompt in the prompt
        field."""
        from TextSegLib.evaluation.demo import DEFAULT_CASE, demo_case

        case = demo_case(DEFAULT_CASE)
        try:
            volume = read_volume(case["image"], modality=case["modality"])
        except VolumeError as error:
            self._say(f"The demo case cannot be read: {first_line(error)}", "error")
            return
        self._show_volume(volume, case["case"])
        self.state.prompt = case["prompt"]

    async def upload_chunk(self, files: list[dict]) -> None:
        """The browser's chunked upload: parts of the file list, then an empty list when all are sent."""
        if files:
            self.upload_parts.extend(files)
            return
        parts, self.upload_parts = self.upload_parts, []
        if self.state.running:
            self._say("A segmentation is running; wait for it or cancel it before loading another volume.", "error")
            return
        if len(parts) != 1:
            self._say(f"Upload one file ({UPLOAD_KINDS}); {len(parts)} were given.", "error")
            return
        from trame.app.file_upload import ClientFile

        upload = ClientFile(parts[0])
        loop = asyncio.get_running_loop()
        try:
            volume = await loop.run_in_executor(None, read_upload, upload.name, upload.content or b"")
        except Exception as error:
            self._say_error(error)
            return
        self._show_volume(volume, case_name(Path(upload.name)).removesuffix(".zip"))

    def _show_volume(self, volume: Volume, name: str) -> None:
        """Replace the scene's volume (and its segments) by ``volume``."""
        from TextSegLib.app.mrml import volume_to_node

        scene = self.slicer.scene
        for node in (self.volume_node, self.segmentation_node, self.probability_node):
            if node is not None:
                scene.RemoveNode(node)
        self.segmentation_node = self.probability_node = None
        self.segments.clear()
        self.case_number += 1
        self.volume = volume
        self.volume_node = volume_to_node(volume, scene, name)
        display = self.slicer.display_manager
        display.show_volume_in_slice_background(self.volume_node)
        display.show_volume_in_slice_foreground(None)
        for view in self.slicer.view_manager.get_slice_views():
            view.set_visible_in_3d(True)
        self._apply_window(self.state.window_preset)
        display.reset_views()
        k, j, i = volume.array.shape
        self.state.volume_name = f"{name} ({i} x {j} x {k} voxels, {volume.modality or 'modality unknown'})"
        self.state.download_name = f"{name}.seg.nrrd"
        self.state.probability_shown = ""
        self._refresh_segments()
        self._say(f"Loaded {name}. Type what to segment and press Segment.")

    # --------------------------------------------------------------------------------------------- segmenting

    def _request(self):
        """The worker request from the panel; raises a :class:`TextSegError` (one line for the user) on bad input."""
        from TextSegLib.core.options import validate_prompt
        from TextSegLib.service.protocol import SegmentRequest

        if self.volume is None:
            raise VolumeError("No volume: open the demo case or upload a volume first.")
        prompt = validate_prompt(self.state.prompt or "")
        if not self.state.model_id:
            raise TextSegValueError("No model chosen: pick one from the list.")
        threshold = None
        text = str(self.state.threshold or "").strip()
        if text:
            try:
                threshold = float(text)
            except ValueError:
                raise TextSegValueError(f"The threshold {text!r} is not a number; give one between 0 and 1, or "
                                        "leave it empty for the model's.") from None
            check_threshold(threshold)
        batch_size = None
        text = str(self.state.batch_size or "").strip()
        if text:
            if not text.isdigit():
                raise TextSegValueError(f"The batch size {text!r} is not a whole number of at least 1; leave it "
                                        "empty to let TextSeg choose.")
            batch_size = check_batch_size(int(text))
        options = SegmentOptions(device=self.state.device, batch_size=batch_size, threshold=threshold,
                                 probability=True, modality=self.volume.modality)
        return SegmentRequest(prompt, [self.state.model_id], options).validate()

    def start_segment(self) -> None:
        """**Segment**: check the panel, then run the job in the background."""
        if self.state.running:
            return
        try:
            request = self._request()
        except Exception as error:
            self._say_error(error)
            return
        self.cancel_requested = False
        self.state.update({"running": True, "cancelling": False, "progress": 0,
                           "progress_text": f"Sending the volume to {self.worker.describe()}", "message": ""})
        name = " ".join(str(self.state.segment_name or "").split()) or None
        self.task = asyncio.ensure_future(self._run(request, name, self.case_number))

    def cancel(self) -> None:
        """**Cancel**: stop the running job; the segments stay as they were."""
        if not self.state.running:
            return
        self.cancel_requested = True
        self.state.cancelling = True
        self.state.progress_text = "Cancelling"
        if self.job is not None:
            self.executor.submit(self.job.cancel)

    async def _call(self, function: Callable, *arguments):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *arguments)

    async def _run(self, request, name: str | None, case_number: int) -> None:
        volume = self.volume
        try:
            self.job = job = await self._call(self.worker.submit, volume, request)
            if self.cancel_requested:
                await self._call(job.cancel)
            while True:
                status = await self._call(job.status)
                if status.total:
                    with self.state:
                        self.state.progress = round(100 * status.done / status.total)
                        if not self.cancel_requested:
                            self.state.progress_text = f"Segmenting: {status.done} of {status.total} slices"
                if status.finished:
                    break
                await asyncio.sleep(POLL_SECONDS)
            result = await self._call(job.result)
            with self.state:
                if result is None:
                    self._say("Cancelled; the segments are as they were.")
                elif case_number != self.case_number:
                    self._say("Another volume was loaded while this one was segmented; its result was dropped.",
                              "error")
                else:
                    self._store(result, name)
        except TextSegError as error:  # the worker's WorkerError included
            with self.state:
                self._say(f"{first_line(error)} The segments are as they were.", "error")
        except Exception as error:
            with self.state:
                self._say_fault(error, " The segments are as they were.")
        finally:
            self.job = None
            with self.state:
                self.state.update({"running": False, "cancelling": False, "progress": 0, "progress_text": ""})

    def _store(self, result: SegmentationResult, name: str | None) -> None:
        """Put a finished result into the scene as a segment, show it, and say what was found (as the Slicer panel
        does, through :mod:`TextSegLib.app.mrml`)."""
        from TextSegLib.app.mrml import describe_result, show_closed_surface, store_in_new_or_existing_node

        self.segmentation_node, segment_id = store_in_new_or_existing_node(
            self.slicer.scene, self.volume_node, self.segmentation_node, result, name)
        self.segments[segment_id] = result
        self.segmentation_node.GetDisplayNode().SetSegmentVisibility(segment_id, True)
        notes = show_closed_surface(self.segmentation_node)
        if not result.empty:
            self._jump_to(result.mask)
        if self.state.probability_shown == segment_id:
            self._show_probability(segment_id)
        self._refresh_segments()
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        text, warned = describe_result(result, segment.GetName(), notes)
        self._say(text, "warning" if warned else "success")

    def _jump_to(self, mask: np.ndarray) -> None:
        """Move every slice view through the voxel of ``mask`` nearest its centre of mass (the views keep their
        field of view)."""
        inside = np.argwhere(mask)
        k, j, i = inside[np.argmin(((inside - inside.mean(axis=0)) ** 2).sum(axis=1))]
        r, a, s, _ = np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.volume.ijk_to_lps() @ np.array([i, j, k, 1.0])
        nodes = self.slicer.scene.GetNodesByClass("vtkMRMLSliceNode")
        for number in range(nodes.GetNumberOfItems()):
            nodes.GetItemAsObject(number).JumpSliceByOffsetting(r, a, s)

    # ------------------------------------------------------------------------------------------ segment list

    def toggle_visibility(self, segment_id: str) -> None:
        display = self.segmentation_node.GetDisplayNode() if self.segmentation_node is not None else None
        if display is not None and segment_id in self.segments:
            display.SetSegmentVisibility(segment_id, not display.GetSegmentVisibility(segment_id))
            self._refresh_segments()

    def delete_segment(self, segment_id: str) -> None:
        if self.segmentation_node is None or segment_id not in self.segments:
            return
        if self.state.probability_shown == segment_id:
            self.toggle_probability(segment_id)
        self.segmentation_node.GetSegmentation().RemoveSegment(segment_id)
        del self.segments[segment_id]
        self._refresh_segments()

    def toggle_probability(self, segment_id: str) -> None:
        """Show the probability map a segment came from over the slices (or hide it when it is shown)."""
        if self.state.probability_shown == segment_id:
            self.slicer.display_manager.show_volume_in_slice_foreground(None)
            self.state.probability_shown = ""
            return
        if segment_id in self.segments:
            self._show_probability(segment_id)

    def _show_probability(self, segment_id: str) -> None:
        from TextSegLib.app.mrml import update_volume_node

        probability = self.segments[segment_id].probability
        if probability is None:
            return
        if self.probability_node is None:
            self.probability_node = self.slicer.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                                        "TextSeg probability")
        update_volume_node(self.probability_node, probability, self.volume_node)
        self.probability_node.CreateDefaultDisplayNodes()
        display = self.probability_node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        if self.slicer.scene.GetNodeByID("vtkMRMLColorTableNodeRainbow") is not None:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
        self.slicer.display_manager.show_volume_in_slice_foreground(self.probability_node)
        for view in self.slicer.view_manager.get_slice_views():
            view.set_foreground_opacity(0.5)
        self.state.probability_shown = segment_id

    def download(self):
        """The segments as a ``.seg.nrrd`` (what ``textseg segment`` writes), as a download attachment."""
        from TextSegLib.io.segnrrd import segment_for_result, write_seg_nrrd

        if not self.segments or self.segmentation_node is None:
            self._say("There is no segment to download yet.", "error")
            return None
        segmentation = self.segmentation_node.GetSegmentation()
        specs = []
        for number in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(number)
            segment = segmentation.GetNthSegment(number)
            spec = segment_for_result(self.segments[segment_id], segment.GetName())
            spec.color = tuple(segment.GetColor())
            specs.append(spec)
        with tempfile.TemporaryDirectory(prefix="textseg-download-") as folder:
            path = Path(folder) / "segments.seg.nrrd"
            try:
                write_seg_nrrd(path, specs, self.volume)
            except TextSegError as error:
                self._say(f"The segments cannot be written: {first_line(error)}", "error")
                return None
            except Exception as error:
                self._say_fault(error)
                return None
            return self.server.protocol.addAttachment(path.read_bytes())


# ------------------------------------------------------------------------------------------------------ start


def serve_web(host: str = DEFAULT_HOST, port: int = WEB_PORT, server: str | None = None,
              token: str | None = None, models_dir: str | None = None,
              announce: Callable[[str], None] = print) -> None:
    """Run the web application until interrupted (blocking). ``server`` (a ``textseg serve`` URL) segments there;
    without it a worker process on this computer segments (started now, in the background)."""
    from trame.app import get_server

    from TextSegLib.engine.catalogue import Catalogue
    from TextSegLib.evaluation.demo import DEMO_MODEL
    from TextSegLib.service.client import RemoteWorker
    from TextSegLib.service.local import LocalWorker
    from TextSegLib.service.protocol import ModelChoice

    if server:
        worker = RemoteWorker(server, token)
        worker.health()
        models = worker.models()
    else:
        environment = {MODELS_DIR_VARIABLE: models_dir} if models_dir else {}
        worker = LocalWorker(environment=environment)
        models = [ModelChoice.from_entry(entry) for entry in Catalogue(models_dir).entries()]
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # as `textseg segment`: ITK's multi-line warnings
    trame = get_server("textseg-web", client_type="vue3")
    app = TextSegWebApp(trame, worker, models, DEMO_MODEL)
    if not server:
        app.executor.submit(worker.start)  # the first Segment then finds the worker ready

    def ready(**_: Any) -> None:
        where = "this computer only" if is_loopback(host) else \
            "every computer that can reach this address; there is no log-in"
        announce(f"TextSeg web: http://{host}:{trame.port}/ (reachable from {where}; Ctrl-C stops it)")

    trame.controller.on_server_ready.add(ready)
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame reads its own options from the command line
    try:
        trame.start(host=host, port=port, open_browser=False, show_connection_info=False)
    finally:
        sys.argv = argv
        if isinstance(worker, LocalWorker):
            worker.stop()
        app.executor.shutdown(wait=False, cancel_futures=True)
