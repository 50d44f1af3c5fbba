"""The `pipeload` command: run | inspect | convert | serve (more subcommands register in COMMANDS).

Each subcommand is a thin consumer of the Python API and runtime; heavy modules are imported
inside the command that needs them, so `pipeload --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import PipeloadError
from .runtime.memory import PREFETCH_DEPTH


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "reference"],
                   help="the activations' dtype, on the weights as stored (auto: float32); bfloat16 halves "
                        "activations and KV cache; reference: float32 on every weight dequantized to float32 "
                        "(exact, slow, large)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _add_budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-limit", default=None, help="memory budget, page cache of its reads included: e.g. 2GB, or auto (what is available "
                        "now less a margin; the default for a model too big for it; otherwise none, all resident)")
    p.add_argument("--prefetch-depth", type=int, default=PREFETCH_DEPTH, help=f"streamed layer groups read ahead (default {PREFETCH_DEPTH})")
    p.add_argument("--ctx", type=int, default=None, help="context positions to reserve (default: the model's)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", "--temp", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.1, help="1 = off (default 1.1)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same tokens (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_run(a: argparse.Namespace) -> int:
    from .api import PipelineModel
    from .runtime.memory import format_bytes

    token = None
    if a.cluster:
        from .cluster.auth import load_token

        token = load_token(a.token_file)
    model = PipelineModel.from_pretrained(a.model, dtype=a.dtype, threads=a.threads, memory_limit=a.memory_limit,
                                          prefetch_depth=a.prefetch_depth, ctx=a.ctx,
                                          cluster=a.cluster, workers=a.workers, parallel=a.parallel,
                                          cluster_token=token, draft=a.draft,
                                          draft_tokens=_draft_tokens(a))
    sampling = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    min_p=a.min_p, repetition_penalty=a.repeat_penalty, seed=a.seed, stop=a.stop)
    if a.chat:
        stream = model.chat([{"role": "user", "content": a.prompt}], stream=True, **sampling)
    else:
        sys.stdout.write(a.prompt)
        stream = model.stream(a.prompt, **sampling)
    reason = None
    for r in stream:
        sys.stdout.write(r.text)
        sys.stdout.flush()
        reason = r.finish_reason or reason
    st = model.stats
    sys.stdout.write("\n")
    print(f"\n[{model.engine.checkpoint.path.name}] prompt: {st['prompt_tokens']} tokens, {st['prompt_tps']:.1f} tok/s"
          f" | generation: {st['generation_tokens']} tokens, {st['generation_tps']:.1f} tok/s"
          f" | peak memory: {format_bytes(st['peak_rss'])} | finish: {reason}", file=sys.stderr)
    print(f"[kernels] {st['kernels']}", file=sys.stderr)
    if st.get("draft") is not None:
        print(f"[speculative] draft {a.draft}: acceptance {st['acceptance_rate']:.0%} "
              f"({st['draft_accepted']}/{st['draft_proposed']} draft tokens), {st['tokens_per_pass']:.2f} tokens per "
              f"target pass ({st['decode_passes']} passes), {st['generation_tps']:.1f} tok/s", file=sys.stderr)
    elif "speculative" in st:
        print(f"[speculative] {st['speculative']}", file=sys.stderr)
    if a.cluster:
        from .cluster.cli import print_cluster_summary

        print_cluster_summary(model.engine)
        model.close()
    if model.plan is not None:
        plan = model.plan
        print(f"[memory plan] budget {format_bytes(plan.budget)}, predicted peak {format_bytes(plan.predicted_peak)}; "
              f"{len(plan.resident)} groups resident, {len(plan.streamed)} streamed "
              f"({format_bytes(plan.streamed_bytes)} per pass, {format_bytes(st.get('bytes_read', 0))} read)",
              file=sys.stderr)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import describe

    from .api import builtin_model_path

    print(describe(builtin_model_path() if a.model is None else a.model))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .inspect import supported

    print(supported())
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .convert import convert
    from .runtime.memory import format_bytes

    bar = tqdm(total=0, unit="B", unit_scale=True, desc="converting", disable=a.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    report = convert(a.src, a.output, quant=a.quant, progress=progress)
    bar.close()
    print(f"wrote {report.path} ({report.tensors} tensors, {format_bytes(report.bytes_written)}); "
          f"peak memory {format_bytes(report.peak_rss)}")
    return 0


def _draft_tokens(a: argparse.Namespace) -> int | str:
    """--draft-tokens as the API takes it: "auto" or an integer (ValueError naming the option)."""
    if a.draft_tokens == "auto":
        return "auto"
    try:
        return int(a.draft_tokens)
    except ValueError:
        raise ValueError(f"--draft-tokens must be 'auto' or an integer >= 1, got {a.draft_tokens!r}") from None


def cmd_serve(a: argparse.Namespace) -> int:
    from .runtime.memory import parse_size
    from .server.security import Limits, load_keys
    from .server.serve import ServeConfig, serve

    limits = Limits(max_request_bytes=parse_size(a.max_request_bytes), max_tokens=a.max_tokens_cap, max_n=a.max_n,
                    max_prompt_chars=a.max_prompt_chars, max_stop=a.max_stop, max_stop_chars=a.max_stop_chars,
                    max_client_requests=a.max_client_requests)
    for name, value in vars(limits).items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    cluster = None
    if a.cluster:
        from .cluster.auth import load_token

        cluster = {"address": a.cluster, "workers": a.workers, "parallel": a.parallel,
                   "token": load_token(a.token_file)}
    return serve(ServeConfig(
        api_keys=load_keys(a.api_key, a.api_key_file), metrics_keys=load_keys(a.metrics_key, env={}), limits=limits,
        models=a.models, host=a.host, port=a.port, memory_limit=parse_size(a.memory_limit),
        total_memory=parse_size(a.total_memory), max_batch=a.max_batch, max_queue=a.max_queue, max_len=a.ctx_size,
        exact=not a.fast_batching, dtype=a.dtype, threads=a.threads, preload=a.preload,
        drain_timeout=a.drain_timeout, log_level=a.log_level,
        cluster=cluster, lanes=a.lanes, draft=a.draft,
        draft_tokens=_draft_tokens(a)))


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over one or more models",
                       description="Serve models behind an OpenAI-compatible API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models), with /health, /metrics and a chat page at /.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="GGUF file or HF folder, optionally aliased as name=path (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--memory-limit", default=None, help="memory budget of each model's worker, e.g. 2GB")
    p.add_argument("--total-memory", default=None,
                   help="budget for all workers together; least recently used idle models are unloaded to fit")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model (default 8)")
    p.add_argument("--lanes", type=int, default=None,
                   help="batches in flight at once per model, each with its own share of --max-batch (default: "
                        "the number of pipeline stages on a cluster, else 1)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot per model; beyond it: 429 (default 64)")
    p.add_argument("--ctx-size", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--fast-batching", action="store_true",
                   help="run each batch as one (padded prompts share attention, no cap of 64 sequences): faster "
                        "prompts, but batched tokens may differ from a lone run's at near-ties (default: bit-identical)")
    p.add_argument("--preload", action="store_true", help="load every model at start instead of on first use")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds to let in-flight requests finish on SIGTERM / Ctrl-C (default 300)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--draft", default=None, metavar="PATH|prompt-lookup|builtin",
                   help="speculative decoding for a request decoding alone with temperature 0 (the same tokens, "
                        "several per pass); batches and sampled requests decode plainly")
    p.add_argument("--draft-tokens", default="auto", metavar="K|auto",
                   help="draft tokens per target pass (default auto: adapted from measured acceptance)")
    g = p.add_argument_group("access", "who may use the server (see README: Serving safely)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (repeatable; also $PIPELOAD_API_KEY; "
                        "a key on the command line is visible to other users of this machine: prefer the file)")
    g.add_argument("--api-key-file", default=None, metavar="FILE", help="API keys, one per line (# comments)")
    g.add_argument("--metrics-key", action="append", default=[], metavar="KEY",
                   help="a key that opens /metrics only (for a Prometheus scraper; repeatable)")
    g = p.add_argument_group("limits", "what one request or one client may ask; beyond a limit: a 4xx naming it")
    g.add_argument("--max-request-bytes", default="4MiB", help="request body size (default 4MiB; 413 beyond)")
    g.add_argument("--max-tokens-cap", type=int, default=None,
                   help="max_tokens per choice, and the default when a request leaves it open (default: the context)")
    g.add_argument("--max-n", type=int, default=16, help="choices per request, prompts x n (default 16)")
    g.add_argument("--max-prompt-chars", type=int, default=262_144,
                   help="prompt characters (or token ids) per request (default 262144)")
    g.add_argument("--max-stop", type=int, default=16, help="stop strings per request (default 16)")
    g.add_argument("--max-stop-chars", type=int, default=256, help="characters of one stop string (default 256)")
    g.add_argument("--max-client-requests", type=int, default=64,
                   help="requests in flight at once from one client address (default 64; 429 beyond)")
    _add_model_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_serve)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    from .cluster.cli import add_cluster_options

    add_cluster_options(p)


def cmd_plan(a: argparse.Namespace) -> int:
    import torch

    if a.cluster:
        from .cluster.cli import cmd_plan_cluster

        return cmd_plan_cluster(a)

    from .runtime.memory import current_rss, format_bytes, parse_size
    from .runtime.moe_plan import active_parameters
    from .runtime.planner import plan_budget
    from .runtime.probe import probe
    from .runtime.spec import open_model

    spec = open_model(a.model, None if a.dtype in ("auto", "reference") else getattr(torch, a.dtype),
                      exact=a.dtype == "reference")
    ckpt, args, dtype = spec.checkpoint, spec.args, spec.dtype
    plan = plan_budget(spec, parse_size(a.memory_limit), current_rss(), a.ctx, a.batch, a.prefetch_depth)
    machine = probe(ckpt.path if ckpt.path.is_file() else None)
    disk = max(machine["disk_direct"], machine["disk_buffered"])
    flops = 2 * active_parameters(spec, a.batch) * a.batch  # a mixture of experts computes with the routed ones
    floors = plan.seconds_per_pass(disk, machine["memory_bandwidth"], flops, machine["matmul_flops_bf16"])
    per_pass = max(floors.values())
    print(f"plan for {ckpt.path.name} ({args.n_layers} layers, {dtype}) under "
          f"{format_bytes(plan.budget) if plan.budget else 'no budget'}:")
    print(plan.table())
    print(f"\nmeasured: disk {machine['disk_direct'] / 1e9:.2f} GB/s O_DIRECT, {machine['disk_buffered'] / 1e9:.2f} GB/s "
          f"buffered; memory {machine['memory_bandwidth'] / 1e9:.1f} GB/s; bf16 matmul "
          f"{machine['matmul_flops_bf16'] / 1e9:.0f} GFLOP/s ({machine['threads']} threads)")
    print("floors per pass over the weights: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in floors.items()))
    bound = max(floors, key=floors.get)
    print(f"bound: at most {a.batch / per_pass:.2f} tokens/s at batch {a.batch} ({bound}-bound)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"pipeload.bench.{a.section}").run(a)


def _add_bench_parser(sub) -> None:
    import importlib

    from .bench import SECTIONS

    p = sub.add_parser("bench", help="benchmarks beside their physical bounds and the peers (see README)")
    sections = p.add_subparsers(dest="section", required=True)
    for name, help_text in SECTIONS.items():
        try:
            module = importlib.import_module(f"pipeload.bench.{name}")
        except ModuleNotFoundError:
            continue
        if not hasattr(module, "add_arguments"):
            continue
        sp = sections.add_parser(name, help=help_text)
        sp.add_argument("--out", default="bench-results", help="folder for JSON, markdown and plots")
        module.add_arguments(sp)
        sp.set_defaults(func=cmd_bench)


def cmd_quantize(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .quantize import quantize_model
    from .runtime.memory import format_bytes

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    bar = tqdm(total=0, unit="B", unit_scale=True, desc=f"quantizing ({a.method})", disable=a.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    report = quantize_model(a.model, a.output, method=a.method, calibration_data=a.calibration,
                            n_samples=a.samples, seq_len=a.seq_len, damp=a.damp, progress=progress)
    bar.close()
    print(f"wrote {report.path} ({format_bytes(report.bytes_written)}, {a.method}) in {report.seconds:.1f} s; "
          f"peak memory {format_bytes(report.peak_rss)}")
    if report.layers:
        gptq = sum(l["gptq_error"] for l in report.layers) / len(report.layers)
        rtn = sum(l["rtn_error"] for l in report.layers) / len(report.layers)
        print(f"{len(report.layers)} matrices by GPTQ on {report.calibration_tokens} calibration tokens: mean relative "
              f"output error {gptq:.2e} (round to nearest: {rtn:.2e})")
    return 0


def cmd_perplexity(a: argparse.Namespace) -> int:
    import json

    from .api import PipelineModel
    from .perplexity import kl_divergence, perplexity, read_text

    model = PipelineModel.from_pretrained(a.model, dtype=a.dtype, threads=a.threads)
    text = read_text(a.text)
    r = perplexity(model.engine, model.tokenizer, text, ctx=a.ctx, stride=a.stride, max_tokens=a.max_tokens)
    result = r.as_dict()
    print(f"{model.engine.checkpoint.path.name}: perplexity {r.perplexity:.4f}, {r.bits_per_byte:.4f} bits/byte "
          f"({r.tokens} tokens, {r.bytes} bytes, ctx {r.ctx}, stride {r.stride}, {r.seconds:.1f} s)")
    if a.kl_base:
        base = PipelineModel.from_pretrained(a.kl_base, dtype=a.dtype, threads=a.threads)
        ids = model.tokenizer.encode(text)[:a.max_tokens]
        kl = kl_divergence(model.engine, base.engine, ids, r.ctx, r.stride)
        result.update(kl)
        print(f"against {base.engine.checkpoint.path.name}: KL divergence {kl['kl_divergence']:.5f} nats/token, "
              f"same top token {100 * kl['same_top_token']:.2f}%")
    if a.json:
        print(json.dumps(result))
    return 0


def _add_quantize_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="write a quantized GGUF: round to nearest or calibrated 4-bit (GPTQ)")
    p.add_argument("model", help="HF folder or GGUF file (best: f16/f32)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path")
    p.add_argument("--method", default="gptq4",
                   help="gptq4 (Q4_K_M types, 4-bit matrices by GPTQ), gptq4_0 (all Q4_0 by GPTQ), rtn4 (gptq4's "
                        "types, round to nearest), or any --quant of convert (default gptq4)")
    p.add_argument("--calibration", default=None,
                   help="calibration text: a .txt or .jsonl file (default: the built-in corpus, training split)")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("perplexity", help="perplexity and bits per byte on a text (sliding window)")
    p.add_argument("model", help="GGUF file or HF folder")
    p.add_argument("--text", required=True, help="a UTF-8 text file, or .jsonl with a \"text\" field per line")
    p.add_argument("--ctx", type=int, default=None, help="window length in tokens (default min(512, context))")
    p.add_argument("--stride", type=int, default=None, help="tokens the window advances, < ctx (default ctx/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--kl-base", default=None, help="also report the KL divergence from this model (e.g. the f16 one)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    _add_model_options(p)
    p.set_defaults(func=cmd_perplexity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeload", description="Run transformer models larger than memory.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate text (default model: the built-in one)")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF folder (default: built-in model)")
    p.add_argument("-p", "--prompt", default="def fibonacci(n):", help="prompt text")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--draft", default=None, metavar="PATH|prompt-lookup|builtin",
                   help="speculative decoding (greedy, lone prompt): a small model with the target's vocabulary, "
                        "n-gram lookup in the text, or the built-in model's sibling; same tokens, fewer target passes")
    p.add_argument("--draft-tokens", default="auto", metavar="K|auto",
                   help="draft tokens per target pass (default auto: adapted from measured acceptance)")
    _add_sampling_options(p)
    _add_model_options(p)
    _add_budget_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="architecture, parameters, per-layer bytes and quant types")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF folder (default: the built-in model)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("models", help="the architectures and tensor types pipeload runs")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plan", help="what stays resident, what streams, every byte, and the speed bound")
    p.add_argument("model", help="GGUF file or HF folder")
    p.add_argument("--memory-limit", default=None, help="e.g. 2GB, 1536MiB, auto (default: no limit)")
    p.add_argument("--ctx", type=int, default=None, help="context positions to reserve (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prefetch-depth", type=int, default=PREFETCH_DEPTH, help=f"streamed groups read ahead (default {PREFETCH_DEPTH})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "reference"])
    p.add_argument("--cluster", default=None, metavar="NODES.yaml",
                   help="plan layers over the nodes of this file (see pipeload/cluster/cli.py): pipeline and "
                        "tensor-parallel predictions")
    p.add_argument("--streams", type=int, default=4, help="with --cluster: also predict this many streams (default 4)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("convert", help="write a GGUF file (layer by layer, bounded memory)")
    p.add_argument("src", help="HF folder or GGUF file")
    p.add_argument("-o", "--output", required=True, help="output .gguf path")
    p.add_argument("--quant", default="f16",
                   help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or llama.cpp's mix q4_k_m")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    _add_serve_parser(sub)
    _add_bench_parser(sub)
    from .cluster.cli import add_parsers as _add_cluster_parsers

    _add_cluster_parsers(sub)
    _add_quantize_parsers(sub)
    from .cli_encoders import add_parsers as _add_encoder_parsers

    _add_encoder_parsers(sub)
    return parser


def _version() -> str:
    from . import __version__

    return f"pipeload {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except PipeloadError as e:
        print(f"pipeload: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"pipeload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npipeload: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
