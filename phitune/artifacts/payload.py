"""An input's files are whole before any weights reader opens them.

Every weights reader (phitune's, transformers', the builder's, onnxruntime's) gets a model
whose files are whole: safetensors headers against the files' sizes and every parameter of
the config's model at its shape, or an ONNX graph that parses and whose external weights the
data file holds. Headers only: cheap.
"""

from __future__ import annotations

from phitune import genai_config
from phitune.artifacts.kinds import ResolvedModel, check_files_regular
from phitune.checkpoint import check_supplied
from phitune.models import check_onnx_graph, check_weight_files, header_shapes


def check_payload(model: ResolvedModel) -> None:
    """Refuse, in one line, a resolved model whose files a reader would choke on."""
    check_files_regular(model.path)
    if model.kind == "onnx-genai":
        try:
            name = genai_config.decoder_file(model.path)
        except Exception:  # no or bad genai_config.json: reported where it is read
            return
        check_onnx_graph(model.path / name)
    else:
        check_weight_files(model.path)
        if model.config:  # every parameter of the config's model, at its shape
            check_supplied(model.path, model.config, header_shapes(model.path))
