"""The layout of ``textseg web``'s page (trame and Vuetify widgets); what the widgets do is in
:mod:`TextSegLib.app.web`."""

from __future__ import annotations

from typing import Any

__all__ = ["build_layout"]


def build_layout(app: Any) -> Any:
    """The page of ``app`` (a :class:`~TextSegLib.app.web.TextSegWebApp`, not imported here: it imports this
    module): the panel (volume, model, prompt, options, Segment/Cancel, messages, the segment list, download) beside
    Slicer's views; returns the trame layout. Widgets are bound to ``app``'s state by name and to its methods as
    handlers."""
    from trame.ui.vuetify3 import VAppLayout
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    upload_trigger = app.server.trigger_name(app.upload_chunk)
    download_trigger = app.server.trigger_name(app.download)
    with VAppLayout(app.server, full_height=True, theme="dark") as layout:
        with v.VNavigationDrawer(permanent=True, width=400, classes="pa-3"):
            html.Div("TextSeg", classes="text-h6")
            html.Div("Text-guided segmentation; segments on {{ where }}.", classes="text-caption mb-2")
            with html.Div(classes="d-flex align-center ga-2"):
                v.VBtn("Open demo case", id="textseg-demo", click=app.open_demo, disabled=("running",),
                       size="small", prepend_icon="mdi-folder-open")
                v.VFileInput(
                    id="textseg-upload", label="Upload a volume", density="compact", hide_details=True,
                    prepend_icon="mdi-upload", disabled=("running",),
                    change=(f"window.load_files_by_chunks($event.target.files, "
                            f"{{ trigger_name: '{upload_trigger}' }})"),
                )
            html.Div("{{ volume_name || 'No volume loaded' }}", id="textseg-volume", classes="text-body-2 my-2")
            v.VSelect(label="Window / level", v_model=("window_preset",), items=("window_presets",),
                      density="compact", hide_details=True, classes="mb-3")
            v.VSelect(id="textseg-model", label="Model", v_model=("model_id",), items=("models",),
                      item_title="title", item_value="id", density="compact", hide_details=True)
            with html.Div(classes="text-caption mt-1"):
                html.Span("{{ model_description }}")
                with v.VIcon(icon="mdi-information-outline", v_if=("model_text_role",), size="small",
                             classes="ml-1"):
                    v.VTooltip(text=("model_text_role",), activator="parent", location="bottom", max_width=380)
            with html.Div(classes="my-1"):
                v.VChip("{{ example }}", v_for="example in model_examples", key="example", size="x-small",
                        classes="ma-1", click="prompt = example")
            v.VTextarea(id="textseg-prompt", label="What to segment (prompt)", v_model=("prompt",), rows=3,
                        auto_grow=True, density="compact", hide_details=True, classes="mt-2")
            v.VTextField(id="textseg-name", label="Segment name (default: the prompt)",
                         v_model=("segment_name",), density="compact", hide_details=True, classes="mt-2")
            with html.Div(classes="d-flex ga-2 mt-2"):
                v.VSelect(label="Device", v_model=("device",), items=("devices",), density="compact",
                          hide_details=True)
                v.VTextField(id="textseg-threshold", label="Threshold", v_model=("threshold",),
                             placeholder=("`model's: ${model_threshold}`",), density="compact",
                             hide_details=True)
                v.VTextField(id="textseg-batch-size", label="Batch size", v_model=("batch_size",),
                             placeholder="automatic", density="compact", hide_details=True)
            v.VBtn("Segment", id="textseg-segment", v_if=("!running",), click=app.start_segment,
                   color="primary", block=True, classes="mt-3")
            v.VBtn("Cancel", id="textseg-cancel", v_else=True, click=app.cancel, disabled=("cancelling",),
                   color="warning", block=True, classes="mt-3")
            v.VProgressLinear(id="textseg-progress", v_if=("running",), model_value=("progress",),
                              height=6, color="primary", classes="mt-2")
            html.Div("{{ progress_text }}", v_if=("running",), classes="text-caption")
            v.VAlert("{{ message }}", id="textseg-message", v_if=("message",), type=("message_type",),
                     density="compact", closable=True, classes="mt-3", click_close="message = ''")
            html.Div("Segments", classes="text-subtitle-2 mt-4")
            with v.VTable(density="compact", id="textseg-segments"), html.Tbody(), \
                    html.Tr(v_for="s in segments", key="s.id", classes="textseg-segment"):
                with html.Td(style="width: 14px"):
                    html.Div(style=("`width: 12px; height: 12px; background: ${s.color}`",),
                             classes="textseg-color")
                with html.Td():
                    html.Div("{{ s.name }}", classes="textseg-name text-body-2")
                    html.Div("{{ s.prompt }}", v_if=("s.prompt !== s.name",), classes="textseg-prompt text-caption")
                html.Td("{{ s.ml }}", classes="textseg-ml text-no-wrap")
                with html.Td(classes="text-no-wrap"):
                    v.VBtn(icon=("s.visible ? 'mdi-eye' : 'mdi-eye-off'",), size="x-small",
                           variant="text", classes="textseg-visibility",
                           click=(app.toggle_visibility, "[s.id]"))
                    v.VBtn(icon="mdi-chart-bell-curve", size="x-small", variant="text",
                           classes="textseg-probability", v_if=("s.probability",),
                           color=("probability_shown === s.id ? 'primary' : undefined",),
                           click=(app.toggle_probability, "[s.id]"))
                    v.VBtn(icon="mdi-delete", size="x-small", variant="text", classes="textseg-delete",
                           disabled=("running",), click=(app.delete_segment, "[s.id]"))
            html.Div("No segments yet.", v_if=("!segments.length",), classes="text-caption")
            v.VBtn("Download .seg.nrrd", id="textseg-download", disabled=("!segments.length",),
                   prepend_icon="mdi-download", block=True, classes="mt-3",
                   click=(f"utils.download(download_name, trigger('{download_trigger}'), "
                          "'application/octet-stream')"))
        with v.VMain(), html.Div(style="position: relative; height: 100vh; display: flex;"):
            app.layout_manager.initialize_layout_grid(layout)
        return layout
