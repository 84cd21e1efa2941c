"""The 50-schema structured-output set (benchmarks/data/schemas50.json) under the grammar: every output parses,
validates (``jsonschema`` with format checking) and ends on its own within the budget, on the tiny random model
(greedy and sampled: a random model never closes anything unaided) and, marked slow, the schemas where
SmolLM2-135M loops ("john_john_john..." in an e-mail, "A.A.A.A..." in a name) on SmolLM2. The Qwen models' runs are
``benchmarks/structured_output.py`` (BENCHMARKS.md)."""

import json
from pathlib import Path

import jsonschema
import pytest

from openautoglm.runtime.sampler import SamplingParams
from openautoglm.toolcall import ChatPlan

CASES = json.loads((Path(__file__).parents[2] / "benchmarks" / "data" / "schemas50.json").read_text())


def _run(engine, cases, max_tokens, **kw):
    prompts, params = [], []
    for c in cases:
        plan = ChatPlan(engine.tokenizer, [{"role": "user", "content": c["prompt"]}], response_format={
            "type": "json_schema", "json_schema": {"name": c["name"], "schema": c["schema"], "strict": True}})
        prompts.append(plan.prompt_ids)
        params.append(SamplingParams(max_tokens=max_tokens, grammar=plan.grammar, **kw))
    g = engine.new_generation(prompts, params)
    for _ in g:
        pass
    for c, s in zip(cases, g.sequences):
        assert s.finish_reason == "stop", (c["name"], s.text)
        jsonschema.validate(json.loads(s.text), c["schema"], format_checker=jsonschema.FormatChecker())


def test_the_set_is_fifty_distinct_valid_schemas():
    assert len(CASES) >= 50 and len({c["name"] for c in CASES}) == len(CASES)
    for c in CASES:
        jsonschema.Draft202012Validator.check_schema(c["schema"])


@pytest.mark.parametrize("sampled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_all_schemas_on_a_random_model(tiny_engine, sampled):
    kw = dict(temperature=1.0, seed=7) if sampled else {}
    for k in range(0, len(CASES), 25):  # two batches: constrained rows of different grammars share each step
        _run(tiny_engine, CASES[k:k + 25], max_tokens=256, **kw)


# the schemas SmolLM2 loops in without the closing steer (benchmarks/results/structured-smollm2-xeon.json: they
# run to the reserve); the whole set on SmolLM2 is benchmarks/structured_output.py (BENCHMARKS.md)
LOOPING = ["uuid_email", "book", "entities", "tree", "const", "top_array", "chat_turns", "invoice"]


@pytest.mark.slow
def test_looping_schemas_on_smollm2(smollm2_path):
    from openautoglm import Engine

    # (O1: the load-time passes and a planned cache, no ahead-of-time compile; eager O0 decodes 8 rows ~3x slower)
    eng = Engine(smollm2_path, progress=False).compile("O1", max_batch=len(LOOPING), max_len=1024)
    _run(eng, [c for c in CASES if c["name"] in LOOPING], max_tokens=512)
