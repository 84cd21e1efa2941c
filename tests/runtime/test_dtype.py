"""The runtime dtype is the engine's (``Engine(dtype=...)``, ``--dtype`` on every command): set at load, before
anything compiles, so the compiled step, its background build and every caller see one dtype."""

import pytest
import torch

from openautoglm import Engine
from openautoglm.compiler import background
from openautoglm.errors import InvalidParameterError


def test_bf16_engine_is_the_model_cast_to_bf16(tiny_engine_dir):
    ids = torch.tensor([[5, 9, 13, 2, 7, 11, 3]])
    pos = torch.arange(ids.shape[1])[None]
    ref = Engine(model=tiny_engine_dir, progress=False)
    ref.model.to(torch.bfloat16)  # the oracle: the fp32 load, cast by hand
    with torch.inference_mode():
        want = ref.model(ids, pos)
    e = Engine(model=tiny_engine_dir, progress=False, dtype="bf16")
    assert e.dtype == "bf16" and {p.dtype for p in e.model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        got = e.model(ids, pos)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and compiled (O1: passes and a planned cache in the runtime dtype), greedy tokens as the eager bf16 model's
    e.compile("O1")
    assert e.compiled.cache.k[0].dtype == torch.bfloat16
    r = e.model_runner()
    assert r.dtype == torch.bfloat16
    a = e.infer(input_data="Hello there", max_tokens=8, temperature=0.0)
    ref.compile("O0")
    b = ref.infer(input_data="Hello there", max_tokens=8, temperature=0.0)
    assert a == b


def test_an_unknown_dtype_is_one_clear_error_before_loading():
    with pytest.raises(InvalidParameterError, match="dtype must be one of fp32, bf16"):
        Engine(model="/nonexistent/model", dtype="fp16")  # (the path is never opened)


def test_a_bf16_engine_never_takes_an_fp32_background_build(tiny_engine_dir):
    k = [background.build_key(tiny_engine_dir, "O3", 1, 2048, "native", "auto", d) for d in ("fp32", "bf16")]
    assert k[0] != k[1]
