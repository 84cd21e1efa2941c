"""The CLI on a tiny model: run prints the same text as the API, info reports the model, chat exits on EOF."""

import json
import subprocess
import sys

import pytest

from openautoglm import cli


def run_cli(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", *args], capture_output=True, text=True,
                       input=stdin, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_run_prints_generated_text_and_figures(tiny_engine, tiny_engine_dir):
    rc, out, err = run_cli("run", "--model", str(tiny_engine_dir), "--prompt", "Hello", "-n", "12", "-q")
    assert rc == 0
    assert out == tiny_engine.infer("Hello", max_tokens=12) + "\n"
    assert "tok/s" in err


def test_run_stream_and_chat_flags(tiny_engine, tiny_engine_dir):
    rc, out, _ = run_cli("run", "--model", str(tiny_engine_dir), "--prompt", "Hi", "-n", "8", "--chat", "--stream", "-q")
    assert rc == 0
    assert out == tiny_engine.infer([{"role": "user", "content": "Hi"}], max_tokens=8) + "\n"


def test_info_json(tiny_engine_dir):
    rc, out, _ = run_cli("info", "--model", str(tiny_engine_dir), "--json", "-q")
    info = json.loads(out)
    assert rc == 0 and info["architecture"] == "llama" and info["context_length"] == 1024
    assert info["parameters"] == sum(p.numel() for p in {id(p): p for p in __import__("openautoglm").Engine(
        model=tiny_engine_dir, progress=False).model.parameters()}.values())
    assert info["file_weight_bytes"] == {"F32": info["runtime_weight_bytes"]["float32"]}


def test_chat_repl_answers_and_exits_on_eof(tiny_engine, tiny_engine_dir):
    rc, out, _ = run_cli("chat", "--model", str(tiny_engine_dir), "-n", "6", "-q", stdin="Hi\n")
    assert rc == 0
    assert out == tiny_engine.infer([{"role": "user", "content": "Hi"}], max_tokens=6) + "\n"


def test_parser_knows_every_subcommand():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "cmd")
    # exactly the product's subcommands (README), each with a handler and a help that exits 0
    assert set(sub.choices) == {"run", "chat", "info", "quantize", "eval", "bench", "serve", "pull", "models",
                                "compile", "eval-tools", "agent"}
    for name, sp in sub.choices.items():
        assert callable(sp.get_default("func")), name
        with pytest.raises(SystemExit) as e:
            p.parse_args([name, "--help"])
        assert e.value.code == 0, name
