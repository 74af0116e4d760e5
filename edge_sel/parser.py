"""The ``edge-sel`` argument parser: every subcommand, its options and its ``--help`` examples.

Usage errors exit with code 2 and the usage line, as argparse does; the commands themselves live in
:mod:`edge_sel.cli`.
"""

from __future__ import annotations

import argparse
import sys

from edge_sel.runtime.errors import EdgeSelError
from edge_sel.runtime.units import parse_size

EXAMPLES = {
    "models": """examples:
  edge-sel models list
  edge-sel models fetch all-minilm-l6-v2
  edge-sel models fetch smollm2-135m-instruct""",
    "export": """examples:
  edge-sel export all-minilm-l6-v2 -o bundles/minilm --verify
  edge-sel export all-minilm-l6-v2 -o bundles/minilm-ce --scoring cross_encoder --seed 0
  edge-sel export smollm2-135m-instruct -o bundles/smollm2 --task rerank --verify
  edge-sel export ~/models/my-cross-encoder -o bundles/ce
  edge-sel export all-minilm-l6-v2 -o bundles/minilm-coreml --format coreml          # + CoreML packages (fp16)
  edge-sel export all-minilm-l6-v2 -o bundles/minilm --calibrate --fused             # + one fused early-ranking graph""",
    "fuse": """examples:
  edge-sel fuse bundles/minilm                     # adds fused.onnx (the calibrated schedule compiled in), in place
  edge-sel fuse bundles/smollm2 -o bundles/smollm2-fused --json
  edge-sel fuse bundles/minilm --no-pruning        # the whole model in one graph, no early ranking
the graph takes token ids and returns every document's score, where it was pruned, and the ranking
(docs/BUNDLE.md, "Fused graph"); its weights stay in the bundle's files.""",
    "rerank": """examples:
  edge-sel rerank bundles/minilm --query "copy a file" --documents docs.txt --top-k 5
  edge-sel rerank bundles/smollm2 --query "..." --documents docs.jsonl --memory-budget 128MB --json
documents: plain text, one document per non-empty line (corpus_id = index among those lines),
or JSONL (one object per line with a non-blank "text" field). A .jsonl/.ndjson file is always read as JSONL;
any other file is JSONL when every non-empty line parses as a JSON object, otherwise plain text.""",
    "demo": """examples:
  edge-sel demo
  edge-sel demo --model smollm2-135m-instruct --memory-budget 128MB""",
    "calibrate": """examples:
  edge-sel calibrate bundles/smollm2                        # builtin calibration text, top-10
  edge-sel calibrate bundles/minilm --top-k 5 --json
  edge-sel calibrate bundles/bge --data my_queries.jsonl    # lines: {"query": "...", "documents": ["...", ...]}
calibration text never overlaps the benchmark text (builtin: docstrings of other stdlib modules).""",
    "generate": """examples:
  edge-sel export smollm2-135m-instruct -o bundles/smol-gen --task generate --verify
  edge-sel generate bundles/smol-gen --prompt "Write a haiku about the sea." --chat
  edge-sel generate bundles/smol-gen --prompt-file book.txt --kv-budget 0.2 --policy mpcache --json
  edge-sel generate bundles/smol-gen -p "Once upon a time" --kv-budget 64MB --temperature 0.8 --seed 1
--kv-budget: tokens per layer (512), a fraction of the prompt (0.2) or bytes for the whole cache (64MB);
default: room for the prompt and every new token. Prompts longer than the model's context are refused.""",
    "profile": """examples:
  edge-sel profile bundles/smollm2 rerank -q "copy a file" -d docs.txt -m 128MB --out prof/
  edge-sel profile bundles/minilm rerank -q "copy a file" -d docs.txt --out prof/ --ops
  edge-sel profile bundles/smol-gen generate --prompt-file book.txt --kv-budget 0.1 --policy mpcache_recall --out prof/
writes trace.json (open in ui.perfetto.dev or chrome://tracing), memory.png, report.html and profile.json.
--ops adds onnxruntime's per-operator profile to the trace; --interval-ms sets the sampler period (default 5).""",
    "devices": """examples:
  edge-sel devices list
  edge-sel devices show iphone-se-3
  edge-sel devices probe --bundle bundles/minilm --bundle bundles/smol-gen""",
    "plan": """examples:
  edge-sel plan bundles/smollm2 --device iphone-se-3 --task rerank --candidates 200 --doc-tokens 128
  edge-sel plan bundles/minilm --device this-machine --task rerank -n 512 --doc-tokens 96 --budget 128MB --json   # after `edge-sel devices probe`
  edge-sel plan bundles/smol-gen --device pixel-8 --task generate --prompt-tokens 2048 --new-tokens 64 --kv-budget 0.1 --policy mpcache_recall
an infeasible plan exits 2 with the reason, the smallest budget and the smallest device that would work.""",
    "verify": """examples:
  edge-sel verify bundles/minilm""",
    "info": """examples:
  edge-sel info bundles/minilm""",
    "bench": """examples:
  edge-sel bench bundles/minilm                                    # 64 synthetic candidates of 128 tokens, pruning off (and on, if calibrated)
  edge-sel bench bundles/smollm2 -n 32,128 -m none,128MB --pruning off,on --json
  edge-sel bench bundles/minilm -n 100 --documents docs.txt --query "copy a file"
  edge-sel bench bundles/smol-gen -p 512,2048 --policy full,mpcache --kv-budget none,0.2
measures edge_sel alone on this device (no torch). The side-by-side comparison with torch, optimum and
kvpress is a developer script of the source checkout: python -m benchmarks.rerank --help""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: exit 2 with the usage line, as argparse does
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except EdgeSelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-sel", description="On-device selection: memory-bounded reranking over exported layer bundles.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    m = cmd("models", "list or fetch the packaged default models")
    msub = m.add_subparsers(dest="models_cmd", metavar="ACTION", parser_class=_Parser)
    msub.required = True
    ml = msub.add_parser("list", help="show packaged models and whether they are fetched")
    ml.add_argument("--json", action="store_true")
    mf = msub.add_parser("fetch", help="download a packaged model into the edge_sel cache")
    mf.add_argument("name")
    mf.add_argument("--force", action="store_true", help="download again even if present")

    e = cmd("export", "export a model to a bundle")
    e.add_argument("model", help="packaged name, local HF directory, .gguf file, or an id in the local HF cache")
    e.add_argument("-o", "--out", required=True, help="bundle directory to write (atomically)")
    e.add_argument("--task", default="rerank", choices=["rerank", "generate"], help="default rerank")
    e.add_argument("--scoring", choices=["yes_no", "cross_encoder", "bi_encoder"], help="default: from the model")
    e.add_argument("--max-length", type=int, help="maximum tokens per candidate (default: the model's)")
    e.add_argument("--verify", action="store_true", help="compare bundle and torch scores; fail above 1e-3")
    e.add_argument("--seed", type=int, default=0, help="seed for freshly initialised head weights")
    e.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    e.add_argument("--drop-layers", metavar="N|auto", help="drop the N layers that matter least (block influence + measured "
                   "ranking effect on calibration text); auto: as many as keep top-10 agreement >= 0.9")
    e.add_argument("--calibrate", action="store_true", help="calibrate early-ranking pruning after export (see `edge-sel calibrate`)")
    e.add_argument("--weights", default="fp32", metavar="{fp32,fp16,int8,int4}",  # checked by the command: one-line error
                   help="how matrices and the embedding table are stored: fp32 (default), fp16, int8 or int4 "
                        "(block-wise MatMulNBits; see docs/BUNDLE.md)")
    e.add_argument("--format", choices=["onnx", "ort", "coreml"], default="onnx",
                   help="ort: onnxruntime's ORT format graphs + the operator config for a reduced build (see `edge-sel convert`); "
                   "coreml: also a CoreML ML Program package per streamed stage (needs coremltools)")
    e.add_argument("--fused", action="store_true", help="also write one ONNX graph running the whole early-ranking call "
                   "(see `edge-sel fuse`; after --calibrate when given)")
    e.add_argument("--coreml-precision", default="fp16", choices=["fp16", "fp32"],
                   help="CoreML packages' weights and arithmetic (default fp16)")
    e.add_argument("--json", action="store_true")

    r = cmd("rerank", "rank documents for a query with a bundle")
    r.add_argument("bundle")
    r.add_argument("--query", "-q", required=True)
    r.add_argument("--documents", "-d", required=True, help="text file (one per line) or JSONL with 'text'; - reads standard input")
    r.add_argument("--top-k", "-k", type=int, default=10, help="results to return (default 10)")
    r.add_argument("--memory-budget", "-m", type=_size, help="e.g. 128MB, 1.5GiB (default: all layers resident)")
    r.add_argument("--instruction", help="decoder rerankers: the <Instruct> line of the prompt")
    r.add_argument("--show-text", action="store_true",
                   help="with --json: add each result's document text (the table always shows it, shortened)")
    r.add_argument("--pruning", choices=["auto", "on", "off"], default="auto",
                   help="early-ranking pruning: auto = the bundle's calibrated schedule if it has one; on = require one; off")
    r.add_argument("--shadow", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                   help="shadow mode: also run this fraction of pruned calls unpruned (bare --shadow: every call); a pruned "
                        "top-K that differs from the full model's tightens the schedule stored in the bundle")
    r.add_argument("--spill-dir", help="folder for hidden states spilled under a tight budget (default: the system temp "
                   "directory; choose a disk-backed one when /tmp is in RAM)")
    r.add_argument("--provider", default="cpu", help="onnxruntime execution provider: cpu (default), auto (CoreML where "
                   "this onnxruntime build has it, else cpu), coreml (on a bundle with CoreML packages: Core ML "
                   "runs them, macOS only), or another provider name")
    r.add_argument("--json", action="store_true",
                   help="print {results, stats, plan} as JSON (plan: the memory estimate next to what was measured)")

    d = cmd("demo", "select from real text (CPython docstrings) with a packaged model")
    d.add_argument("--model", default="all-minilm-l6-v2", help="all-minilm-l6-v2 (default) or smollm2-135m-instruct")
    d.add_argument("--memory-budget", "-m", type=_size, default=None, help="default: 128MB (MiniLM) / 192MB (SmolLM2)")
    d.add_argument("--pool", type=int, default=None, help="number of candidate docstrings, the questions' answers added when not among "
                   "them (default: 200 MiniLM, 48 SmolLM2)")
    d.add_argument("--top-k", "-k", type=int, default=3, help="results shown per question (default 3)")
    d.add_argument("--json", action="store_true")

    c = cmd("calibrate", "calibrate early-ranking pruning for a bundle (runtime only, no torch); rewrites its manifest")
    c.add_argument("bundle")
    c.add_argument("--data", default="builtin", help="'builtin' (default) or a JSONL file of {query, documents}")
    c.add_argument("--top-k", "-k", type=int, default=10, help="the top-K the schedule must always keep (default 10)")
    c.add_argument("--method", default="auto", choices=["auto", "probe", "head", "cosine"], help="how a layer is scored")
    c.add_argument("--rule", default="auto", choices=["auto", "margin", "rank", "spread"],
                   help="margin = drop clusters scoring below the K-th best minus a calibrated margin; rank = keep a calibrated "
                        "fraction of the candidates; spread = a margin in units of each query's own score spread near the "
                        "K-th best; auto (default) = the rules measured safe on text calibration never saw (margin)")
    c.add_argument("--safety", type=float, default=None,
                   help="multiplier over the calibration worst case (default: 3 for margins, 1.0 for rank fractions, "
                        "1.25 for spread margins; "
                        "split-half validation raises it when needed)")
    c.add_argument("--queries", type=int, default=None, help="builtin data: number of queries (default 16)")
    c.add_argument("--candidates", type=int, default=None, help="builtin data: candidates per query (default 32)")
    c.add_argument("--check", default="", help="comma-separated text domains calibration never sees (botchan, wordnet, "
                   "docstrings): trace a few queries of each and report every candidate schedule on them")
    c.add_argument("--check-queries", type=int, default=8, help="queries per --check domain (default 8)")
    c.add_argument("--max-layers", type=int, default=4, help="at most this many pruning layers")
    c.add_argument("--memory-budget", "-m", type=_size, help="run calibration under this budget")
    c.add_argument("--json", action="store_true")

    from edge_sel.runtime.policies import REGISTRY

    policies = ", ".join(REGISTRY)
    g = cmd("generate", "generate text with a generate bundle under a KV-cache budget")
    g.epilog = f"{EXAMPLES['generate']}\npolicies: {policies} (combine with +)."
    g.add_argument("bundle")
    g.add_argument("--prompt", "-p", help="the prompt text")
    g.add_argument("--prompt-file", help="read the prompt from a UTF-8 text file (- : standard input)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128, help="default 128 (clamped to the context)")
    g.add_argument("--kv-budget", "-b", default=None, help="512 (tokens/layer) | 0.2 (of the prompt) | 64MB (bytes, whole cache)")
    g.add_argument("--policy", default="full", help=f"KV policy (default full): {policies}, or a+b")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature (default 1.0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--provider", default="cpu", help="onnxruntime execution provider: cpu (default), auto (CoreML where "
                   "this onnxruntime build has it, else cpu), coreml (on a bundle with CoreML packages: Core ML "
                   "runs them, macOS only), or another provider name")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "finish_reason", "stats", "plan"} as JSON')

    qz = cmd("quantize", "write a copy of a bundle with smaller weights (fp16, or int8 / int4 MatMulNBits blocks; "
             "--method dynamic: onnxruntime's dynamic int8 quantization) and measure what it costs in ranking agreement")
    qz.add_argument("bundle")
    qz.add_argument("-o", "--out", required=True, help="bundle directory to write (atomically)")
    qz.add_argument("--weights", default="int8", metavar="{fp16,int8,int4,uint8}",
                    help="fp16 / int8 / int4: weight-only, every matrix, the embedding table and a head over 1 MiB (the "
                         "generate LM head; smaller heads stay float32) (default int8); "
                         "with --method dynamic: int8 / uint8 layer weights with activations quantized per call")
    qz.add_argument("--method", default="weight-only", choices=["weight-only", "dynamic"],
                    help="weight-only (default: MatMulNBits blocks, activations as --accuracy-level says) or dynamic "
                         "(MatMulInteger)")
    qz.add_argument("--block-size", type=int, default=32, help="int8/int4: values sharing one scale (default 32)")
    qz.add_argument("--accuracy-level", type=int, choices=[0, 4], default=None,
                    help="int8/int4: MatMulNBits' compute precision, 0 = float activations, 4 = int8 activations (faster "
                         "one token at a time) for every matrix; default 4 at 8 bits, at 4 bits 0 for reranking and 4 for "
                         "generation except the MLP down projection (0)")
    qz.add_argument("--gguf", default=None, metavar="FILE",
                    help="int8/int4: the GGUF file the bundle was exported from, whose Q4_0/Q4_1/Q8_0 blocks are kept "
                         "(default: the bundle's recorded source, when it is a GGUF file here)")
    qz.add_argument("--no-measure", action="store_true", help="skip the agreement measurement on the builtin calibration data")
    qz.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    qz.add_argument("--json", action="store_true")

    cv = cmd("convert", "rewrite a bundle's graphs in onnxruntime's ORT format (mobile and minimal builds) with the "
             "required-operators config for a reduced build")
    cv.add_argument("bundle")
    cv.add_argument("--format", dest="graph_format", choices=["ort"], default="ort", help="target graph format")
    cv.add_argument("-o", "--out", help="write a converted copy here (default: convert the bundle in place, atomically)")
    cv.add_argument("--optimization", choices=["basic", "extended", "all"], default="all",
                    help="onnxruntime graph optimizations applied before saving (default all: fastest, needs contrib ops)")
    cv.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    cv.add_argument("--json", action="store_true")

    fu = cmd("fuse", "add one ONNX graph that runs a rerank bundle's whole early-ranking call (embedding, every layer, "
             "in-graph pruning at the schedule's layers, scores) for apps with stock onnxruntime")
    fu.add_argument("bundle")
    fu.add_argument("-o", "--out", help="write a copy with the fused graph here (default: add it in place, atomically)")
    fu.add_argument("--no-pruning", action="store_true", help="compile no schedule in: the whole model for every document")
    fu.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    fu.add_argument("--json", action="store_true")

    v = cmd("verify", "check a bundle's files against its manifest (sizes and sha256)")
    v.add_argument("bundle")
    v.add_argument("--json", action="store_true")

    i = cmd("info", "summarise a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")

    from .devices_cli import add_devices_arguments, add_plan_arguments
    from .profile import add_arguments as add_profile_arguments

    add_devices_arguments(cmd("devices", "device profiles: list, show one, or probe this machine"))
    add_plan_arguments(cmd("plan", "predict a call's plan, peak memory and latency on a device; refuse what cannot fit"), _size)

    add_profile_arguments(cmd("profile", "run one rerank or generate call under the memory profiler: trace, plot, report"))

    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(cmd("bench", "measure edge_sel on this device with a bundle (no torch): rerank latency and peak "
                                     "RSS, or generation prefill tokens/s and decode ms/token"))
    return p
