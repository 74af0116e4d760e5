"""``edge-sel devices list|show NAME|probe`` and ``edge-sel plan``: device profiles and plans made before shipping."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.units import format_min_size, format_size


def cmd_devices(args, console) -> int:
    from edge_sel.devices import profiles

    if args.devices_cmd == "list":
        rows = [profiles.load(n) for n in profiles.names()]
        if args.json:
            print(json.dumps([{k: d[k] for k in ("name", "title", "kind", "ram_bytes", "app_memory_limit_bytes",
                                                 "sustained_gflops")} for d in rows]))
            return 0
        from rich.table import Table

        t = Table(title="device profiles")
        t.add_column("name", no_wrap=True)  # what --device takes: never cut short
        for col in ("device", "RAM", "app limit", "mem BW", "storage read", "GFLOPS (est.)"):
            t.add_column(col)
        for d in rows:
            t.add_row(d["name"], d["title"], format_size(d["ram_bytes"]),
                      format_size(d["app_memory_limit_bytes"]) if d["app_memory_limit_bytes"] else "none",
                      f"{d['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", f"{d['storage_read_bytes_per_s'] / 1e9:.2f} GB/s",
                      f"{d['sustained_gflops']:.0f}")
        console.print(t)
        return 0
    if args.devices_cmd == "show":
        doc = profiles.load(args.name)
        print(json.dumps(doc, indent=1))
        return 0
    from edge_sel.devices.probe import probe

    with console.status("probing", spinner="dots") if not args.json else contextlib.nullcontext() as status:
        doc = probe(args.name, args.bundle or (), args.storage_dir,
                    say=lambda m: status.update(f"probing: {m}") if status is not None else None)
    target = Path(args.out) if args.out else profiles.user_dir() / f"{doc['name']}.json"
    if target.is_file():  # probing more bundles adds to what was probed before
        try:
            previous = json.loads(target.read_text()).get("measured", {}).get("bundles", {})
        except (OSError, ValueError):
            previous = {}
        doc["measured"]["bundles"] = {**previous, **doc["measured"]["bundles"]}
    path = profiles.save(doc, target)
    if args.json:
        print(json.dumps({"profile": str(path), **doc}))
    else:
        console.print(f"[green]wrote[/] {path}: memory {doc['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s · storage read "
                      f"{doc['storage_read_bytes_per_s'] / 1e9:.2f} GB/s · matmul {doc['sustained_gflops']:.0f} GFLOPS · "
                      f"{len(doc['measured']['bundles'])} bundle(s) probed")
    return 0


def _smallest_device(need: int) -> str | None:
    from edge_sel.devices import profiles
    from edge_sel.devices.planner import device_budget

    fits = sorted((device_budget(d), d["name"]) for d in map(profiles.load, profiles.names())
                  if d["kind"] != "measured" and device_budget(d) >= need)
    return fits[0][1] if fits else None


def cmd_plan(args, console) -> int:
    from edge_sel.devices import planner, profiles
    from edge_sel.runtime.bundle import Bundle

    device = profiles.load(args.device)
    bundle = Bundle.open(args.bundle)
    if bundle.task != args.task:
        raise InputError(f"{bundle.root} is a {bundle.task!r} bundle, not {args.task!r}")
    try:
        if args.task == "rerank":
            if args.candidates is None or args.doc_tokens is None:
                raise InputError("plan --task rerank needs --candidates N and --doc-tokens T")
            if args.candidates < 1 or args.doc_tokens < 1 or args.query_tokens < 0:
                raise InputError("--candidates and --doc-tokens must be positive, --query-tokens not negative")
            out = planner.plan_rerank(bundle, device, args.candidates, args.doc_tokens, args.query_tokens, args.budget)
        else:
            if args.prompt_tokens is None or args.prompt_tokens < 1 or args.new_tokens < 1:
                raise InputError("plan --task generate needs --prompt-tokens N (positive) and --new-tokens M >= 1")
            if args.prompt_tokens >= bundle.max_length:
                raise InputError(f"--prompt-tokens {args.prompt_tokens} is beyond the model's context of {bundle.max_length}")
            out = planner.plan_generate(bundle, device, args.prompt_tokens, args.new_tokens, args.kv_budget, args.policy,
                                        args.budget)
    except BudgetError as e:
        need = e.minimum_bytes
        budget = args.budget if args.budget is not None else planner.device_budget(device)
        alt = _smallest_device(need) if need else None
        reason = str(e).split(". ")[0].rstrip(".")
        raise BudgetError(f"infeasible on {device['name']} with a {format_size(budget)} budget: {reason}; smallest budget "
                          f"that works: {format_min_size(need) if need else 'unknown'}; smallest device that works: "
                          f"{alt or 'none of the profiles'}", minimum_bytes=need) from None
    if args.json:
        print(json.dumps(out))
        return 0
    lines = [f"[bold]{args.task}[/] on {device['title']} · budget {format_size(out['budget_bytes'])}"]
    if args.task == "rerank":
        lines.append(f"window {out['window_layers']}/{out['layers']} layers · chunk {out['chunk_tokens']} tokens"
                     + (" · hidden states spilled to storage" if out["spill"] else ""))
    else:
        lines.append(f"KV {out['kv_resident_tokens']} resident + {out['kv_fetch_tokens']} fetch tokens per layer"
                     + (" · look-once prefill scratch" if out["prefill_scratch"] else ""))
    lines.append(f"predicted peak {format_size(out['peak_bytes'])} above idle ("
                 + ", ".join(f"{k} {format_size(v)}" for k, v in out["components"].items() if k != "total")
                 + f") · predicted latency {out['latency_s']:.2f} s ({out['latency_basis']})")
    for line in lines:
        console.print(line)
    return 0


def add_devices_arguments(p) -> None:
    sub = p.add_subparsers(dest="devices_cmd", metavar="ACTION", parser_class=type(p))
    sub.required = True
    ls = sub.add_parser("list", help="the packaged and probed device profiles")
    ls.add_argument("--json", action="store_true")
    sh = sub.add_parser("show", help="one profile as JSON (its figures and sources)")
    sh.add_argument("name")
    pr = sub.add_parser("probe", help="measure this machine (and the layer costs of the given bundles); save a profile")
    pr.add_argument("--bundle", "-b", action="append", help="a bundle whose per-layer costs to measure (repeatable)")
    pr.add_argument("--name", default="this-machine", help="profile name (default this-machine)")
    pr.add_argument("--out", help="write the profile here (default: $EDGE_SEL_HOME/devices/NAME.json)")
    pr.add_argument("--storage-dir", help="folder for the storage-read test file (default: the system temp directory)")
    pr.add_argument("--json", action="store_true")


def add_plan_arguments(p, size) -> None:
    p.add_argument("bundle")
    p.add_argument("--device", "-D", required=True, help="a profile name (edge-sel devices list) or a .json path")
    p.add_argument("--task", required=True, choices=["rerank", "generate"])
    p.add_argument("--candidates", "-n", type=int, help="rerank: number of candidates")
    p.add_argument("--doc-tokens", type=int, help="rerank: tokens per candidate document")
    p.add_argument("--query-tokens", type=int, default=16, help="rerank: tokens of the query (default 16)")
    p.add_argument("--prompt-tokens", type=int, help="generate: prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="generate: tokens to generate (default 128)")
    p.add_argument("--kv-budget", default=None, help="generate: as for `edge-sel generate`")
    p.add_argument("--policy", default="full", help="generate: KV policy")
    p.add_argument("--budget", type=size, help="memory budget (default: the device's app limit x 0.75, or half its RAM)")
    p.add_argument("--json", action="store_true")
