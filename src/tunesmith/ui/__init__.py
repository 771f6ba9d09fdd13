"""`tunesmith webui`: configure, launch, watch, chat and export in the browser (Gradio).

The page works offline: Gradio's usage reporting and update check are turned off, and its
assets (fonts included) are served by the local server.
"""

from __future__ import annotations

import os


def launch(host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page until interrupted. Binds 127.0.0.1 unless told otherwise."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio when imported: no phoning home
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        from tunesmith.errors import UserError

        raise UserError("the web UI needs Gradio, which is not installed.",
                        hint="pip install 'tunesmith[webui]'") from None
    from tunesmith.ui.app import CSS, WebUI, build_app, cleanup

    ui = WebUI()
    app = build_app(ui)
    app.queue(default_concurrency_limit=4)
    try:
        app.launch(server_name=host, server_port=port, css=CSS, ssr_mode=False, show_error=True,
                   footer_links=[], quiet=False)
    finally:
        cleanup(ui)
