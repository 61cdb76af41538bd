"""scripts/setup.sh's warm-up (qformat.runtime.warm): its tiny models are ordinary files in the
layouts qconvert writes for each scheme, and warming runs both paths of the model on them."""
from __future__ import annotations

from qformat.reader import QbinReader
from qformat.runtime import warm


def test_warm_models_have_the_layouts_of_their_scheme(tmp_path):
    for scheme, projection, head in (("int4-g64", "q4", "q8"), ("int8", "q8", "q8"), ("f16", "f16", "f16")):
        r = QbinReader(warm.write_model(tmp_path / f"{scheme}.qbin", scheme), verify=True)
        assert r["layers.0.attn.wq"].kind == projection and r["tok_embeddings"].kind == head
        assert r.model == warm.ARGS


def test_warm_runs_every_default_scheme():
    done = warm.warm()
    assert [s for s, _ in done] == list(warm.DEFAULT_SCHEMES)
    assert all(seconds > 0 for _, seconds in done)
