"""distsparse export: a trained model folder to a verified ONNX deployment folder.

- ``build``: rebuild the trained model (weights, QAT structure, scales) and trace it to ONNX;
  the task table ``EXPORT_TASKS`` says what each task exports.
- ``graph``: ONNX graph surgery (int8 weight initializers, row-gathered embeddings, compact names) and lookups.
- ``verify``: the checks against the PyTorch model, the parity tolerance rule, and the re-check
  of a deployment folder (``distsparse verify``).
- ``cli``: the two commands.
"""
from ..extras import require

# Checked first, so `distsparse export` names the missing extra before it loads anything.
require("onnx", "export", "distsparse export")
require("onnxruntime", "export", "distsparse export")

from .build import EXPORT_TASKS, load_trained, sample_inputs  # noqa: E402
from .cli import export_main, verify_main  # noqa: E402
from .verify import ExportCheckError, check_export, verify_deployment  # noqa: E402

__all__ = ["EXPORT_TASKS", "ExportCheckError", "check_export", "export_main", "load_trained",
           "sample_inputs", "verify_deployment", "verify_main"]
