"""The web console and HTTP API of ``pacs-bridge serve`` (docs/console.md).

:class:`pacs_bridge.web.server.WebServer` serves :func:`pacs_bridge.web.app.create_app`
with uvicorn in a thread of the service: studies and their results, failures
and retries, image upload with a PDF report, the model card, a JSON API with
its OpenAPI document, DICOMweb STOW-RS (PS3.18 10.5), ``/healthz`` and
``/metrics``.
"""

__all__: list[str] = []
