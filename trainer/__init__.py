"""Training, evaluation and ONNX export of the fracture-detection CNN.

The trainer reads images and builds model inputs only through
:mod:`pacs_bridge.imaging.loader` and :mod:`pacs_bridge.imaging.preprocess`,
so that the exported model sees at inference exactly the tensors it was
trained on. TensorFlow is imported lazily by the modules that need it.
"""

BODY_PARTS: tuple[str, ...] = ("hand", "leg", "hip", "shoulder")

__all__ = ["BODY_PARTS"]
