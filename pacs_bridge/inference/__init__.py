"""The fracture model at run time.

- :mod:`.manifest`: the model folder contract (``model.json``), validated.
- :mod:`.model`: :func:`~.model.load_model`, the ONNX Runtime session and providers.
- :mod:`.heatmap`: class-activation map back on the original image, box and peak.
- :mod:`.analyse`: :class:`~.analyse.Analyser` (decode, preprocess, batch, locate).
- :mod:`.infer_cli`: ``pacs-bridge infer``.

Nothing here imports TensorFlow.
"""

__all__ = ["analyse", "heatmap", "infer_cli", "manifest", "model"]
