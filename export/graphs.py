"""Write one torch module as an ONNX graph whose weights live in an external, mmap-able data file."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from .adapters.base import GraphSpec

OPSET = 17


def export_graph(spec: GraphSpec, path: Path, external: bool = True) -> str | None:
    """Export ``spec`` to ``path``; with ``external`` all initializers go to ``<name>.data`` beside it.

    Uses the TorchScript-based exporter (``dynamo=False``): an order of magnitude faster per layer than the dynamo
    exporter, with the same outputs. Returns the data file name or None.
    """
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module, spec.sample_inputs, buf, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    if not external:
        onnx.save_model(model, str(path))
        return None
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=0, convert_attribute=False)
    return data_name
