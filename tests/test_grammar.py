"""Constrained decoding (runtime/grammar.py) through the engine: sampled text that must follow a
JSON schema does, on both tokenizer kinds, with many sequences batched together."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from tiny_models import make_tiny_checkpoint  # noqa: E402

import qformat  # noqa: E402
from qformat.convert import convert  # noqa: E402
from qformat.runtime.engine import Engine, Request  # noqa: E402
from qformat.runtime.grammar import json_schema_grammar  # noqa: E402
from qformat.runtime.sampling import SamplingParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["hf-json", "sentencepiece"])
def model(request, tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch="llama", tied=True, seed=5,
                                  tokenizer=request.param)
    path = tmp_path_factory.mktemp("qbin") / "tiny.qbin"
    convert(folder, path, "int8", progress=False, clip_search=False)
    return qformat.load(path, threads=1)


@pytest.mark.parametrize("schema", [SCHEMA, None], ids=["schema", "any-object"])
def test_sampled_text_follows_the_schema(model, schema):
    """Eight sampled sequences at temperature 1.2 (a random model left alone writes no JSON) all
    end by their grammar with text that parses and validates; the KV blocks all come back."""
    grammar = json_schema_grammar(schema)
    engine = Engine(model.transformer, model.tokenizer, max_batch=8)
    rng = np.random.default_rng(0)
    seqs = [engine.submit(Request([int(t) for t in rng.integers(3, model.args.vocab_size, 4 + i)], 200,
                                  SamplingParams(temperature=1.2), seed=i, grammar=grammar))
            for i in range(8)]
    engine.run_all()
    assert model.transformer.pool.blocks_in_use == 0
    for seq in seqs:
        text = model.tokenizer.decode(seq.generated)
        if seq.finish_reason == "length":  # unbounded any-object JSON may run out of tokens
            assert schema is None
            continue
        assert seq.finish_reason in ("grammar", "eos"), (seq.finish_reason, text)
        value = json.loads(text)
        jsonschema.validate(value, schema or {"type": "object"})
        assert "".join(seq.pieces) == text


def test_unconstrained_text_is_not_json(model):
    """The same sampling without the grammar: the check above is not passing by chance."""
    engine = Engine(model.transformer, model.tokenizer, max_batch=8)
    seqs = [engine.submit(Request([5, 6, 7, 8 + i], 40, SamplingParams(temperature=1.2), seed=i)) for i in range(8)]
    engine.run_all()
    texts = [model.tokenizer.decode(s.generated) for s in seqs]
    assert not any(t.startswith("{") and t.rstrip().endswith("}") for t in texts)


def test_bad_schema_is_a_clear_error(model):
    engine = Engine(model.transformer, model.tokenizer)
    with pytest.raises(ValueError, match="foo"):
        engine.token_grammar().check(json_schema_grammar({"type": "foo"}))


def test_generate_with_json_schema(model):
    text = "".join(model.generate([5, 6, 7], max_tokens=120, temperature=1.0, seed=3, json_schema=SCHEMA))
    jsonschema.validate(json.loads(text), SCHEMA)
    assert model.stats.stop_reason == "grammar"
    assert model.transformer.pool.blocks_in_use == 0
