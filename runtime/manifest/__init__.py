"""The bundle manifest, typed: parsed and validated once, then read as frozen dataclasses.

``Manifest.parse(raw_json_dict, where)`` checks every field's type, range and allowed values and raises
:class:`BundleError` naming the field (``…/manifest.json: layers[3].weights: expected a string or null, got 7``).
Attribute names mirror the JSON keys (``m["model"]["scoring"]`` is ``spec.model.scoring``); optional fields get
their defaults here, so readers never ``.get`` with a fallback. Keys this version does not know are kept
(``unknown``) and written back by :meth:`Node.to_dict`, which reproduces the parsed JSON. Passes that rewrite a
manifest use :meth:`Node.replace` (validated) or ``dataclasses.replace``. ``docs/BUNDLE.md`` specifies the format.

One module per part of the format: ``node`` (reading JSON, the node base), ``document`` (the whole manifest, its
cross-field rules, format version rules), ``model``, ``graphs``, ``weights``, ``schedule``, ``compiled`` (ORT,
CoreML, fused), ``files`` (listing and export record), ``edits`` (raw-dict edits the exporter and passes make).
"""

from .compiled import COREML_PRECISIONS, GRAPH_FORMATS, CoreMLPackages, CoreMLStage, FusedGraph, OrtInfo
from .document import CREATED_BY, FORMAT, FORMAT_VERSION, MIN_FORMAT_VERSION, Manifest, required_version
from .edits import (WRITER_KEYS, editable, embed_entry, embed_files, graph_entries, with_schedule, with_weights,
                    with_weights_facts, without_layers)
from .files import ExportInfo, FileEntry
from .graphs import EMPTY_POS, GraphFile, GraphIO, HeadSpec, LayerIO, LayerSpec
from .model import (EMBEDDING_RULES, FINAL_LAYER_OUTPUTS, POOLINGS, SCORE_RULES, SCORINGS, TASK_SCORINGS, TASKS,
                    ChatSpec, Dims, EmbeddingRule, ModelInfo, PromptSpec, TokenIds)
from .node import MANIFEST, Node, freeze, thaw
from .schedule import SCHEDULE_METHODS, SCHEDULE_RULES, Agreement, DropCost, ScheduleLayer, ScheduleSpec
from .weights import (DTYPES, SCALE_DTYPES, TABLE_BITS, WEIGHT_FORMATS, ArraySpec, QuantAgreement, Quantization,
                      RawArray, TableEncoding, TensorFormat, WeightsSpec)

__all__ = ["Manifest", "ModelInfo", "Dims", "ArraySpec", "LayerSpec", "GraphFile", "GraphIO", "HeadSpec", "LayerIO",
           "EmbeddingRule", "PromptSpec", "TokenIds", "ChatSpec", "ScheduleSpec", "ScheduleLayer", "Quantization",
           "ExportInfo", "CoreMLPackages", "FusedGraph", "CoreMLStage", "FileEntry", "RawArray", "TableEncoding",
           "TensorFormat", "WeightsSpec", "WEIGHT_FORMATS", "required_version", "graph_entries", "embed_entry",
           "embed_files", "with_weights", "with_weights_facts", "DropCost", "Agreement", "QuantAgreement", "FORMAT",
           "FORMAT_VERSION", "MIN_FORMAT_VERSION", "MANIFEST", "EMPTY_POS", "CREATED_BY", "DTYPES", "freeze", "thaw",
           "editable", "with_schedule", "without_layers", "Node", "OrtInfo", "COREML_PRECISIONS", "GRAPH_FORMATS",
           "WRITER_KEYS", "EMBEDDING_RULES", "FINAL_LAYER_OUTPUTS", "POOLINGS", "SCORE_RULES", "SCORINGS",
           "TASK_SCORINGS", "TASKS", "SCHEDULE_METHODS", "SCHEDULE_RULES", "SCALE_DTYPES", "TABLE_BITS"]
