"""The server at O3 (the default level once built) on GGML block weights: requests served together, queued
behind each other with chunked prefills, give exactly the tokens (and log-probabilities) each gives alone, and
the same with the prefix cache on and off: every query's attention is computed as it is alone
(``models.layers.batch_invariant``) and the int8 block kernels compute each row alone. Bit for bit, no
near-tie allowance. (The tiny model's 256-token context is too short for torch's attention to round differently
by chunking; what pins those causes is tests/models/test_attention.py and benchmarks/concurrency_ties.py on the
real models.)"""

import sys
from pathlib import Path

import pytest
import torch

from openautoglm import Engine, kernels
from openautoglm.runtime.sampler import SamplingParams
from openautoglm.runtime.scheduler import Request, Scheduler

pytestmark = pytest.mark.compile

sys.path.insert(0, str(Path(__file__).parent.parent / "formats"))


@pytest.fixture(scope="module")
def e3(tmp_path_factory, oag_cache):
    from conftest import make_hf_model
    from gguf_util import write_gguf
    from test_fuzz_files import tiny_tokenizer_meta

    if not kernels.interleaves("Q8_0", 64):
        pytest.skip("no interleaved int8 kernels on this CPU (no AVX-512 VNNI)")
    p = write_gguf(tmp_path_factory.mktemp("inv") / "tiny-q8.gguf", make_hf_model("llama-untied"), "llama",
                   qtype="Q8_0", tokenizer_meta=tiny_tokenizer_meta())
    return Engine(model=p, progress=False).compile("O3", max_batch=4, max_len=256)


def _run(e, prompts, n, prefix_cache=True, logprobs=None):
    s = Scheduler(e.model_runner(compile_missing=False), e.tokenizer, e.eos_ids, max_batch=4, max_len=256,
                  prefill_chunk=24, prefix_cache=prefix_cache)
    out = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        s.submit(Request(p, SamplingParams(max_tokens=n, ignore_eos=True), lambda ev, i=i: ev.token_id is not None
                         and out[i].append((ev.token_id, ev.logprob)), logprobs=0))
    while not s.idle:
        s.step()
    return out, s


def test_served_together_equals_alone_bit_for_bit_at_o3(e3):
    assert e3.optimize_level == "O3"
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    prompts = [(shared if i % 2 else []) + torch.randint(0, 256, (5 + 9 * i,), generator=g).tolist()
               for i in range(7)]
    alone = [_run(e3, [p], 24)[0][0] for p in prompts]
    together, s = _run(e3, prompts, 24)
    assert together == alone  # tokens and log-probabilities, exactly
    assert s.compiled_steps > 0 and s.cached_tokens > 0  # the compiled step ran, prefixes came from the cache
    off, _ = _run(e3, prompts, 24, prefix_cache=False)
    assert off == together
