"""Label-only teacher access: the single seam between this package and the black box.

Implementations: :class:`TorchOracle` (a local PyTorch model; its logits never leave
the object), :class:`OnnxOracle` (an ONNX file run with onnxruntime),
:class:`HttpOracle` (a teacher behind an HTTP endpoint speaking the small JSON protocol
of :mod:`zsdb3kd.serve`) and :class:`FunctionOracle` (any callable returning labels, e.g.
a client for a vendor's own API). :func:`load_oracle` opens one from a path or URL.
"""

from .base import Bounds, FunctionOracle, LabelOracle, OracleError, QueryBudgetExceeded
from .http import HttpOracle, HttpSettings, http_settings_from_env
from .load import TeacherReading, TeacherSpec, is_url, load_oracle, teacher_logits, teacher_sha256
from .local import TorchOracle
from .onnx import OnnxOracle
from .protocol import PROTOCOL, decode_images, encode_images
from .querylog import QueryLog

__all__ = ["Bounds", "FunctionOracle", "HttpOracle", "HttpSettings", "LabelOracle", "OnnxOracle", "OracleError",
           "PROTOCOL", "QueryBudgetExceeded", "QueryLog", "TeacherReading", "TeacherSpec", "TorchOracle",
           "decode_images", "encode_images", "http_settings_from_env", "is_url", "load_oracle", "teacher_logits",
           "teacher_sha256"]
