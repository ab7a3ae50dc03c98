"""A demonstration pool of the shared synthetic world (its open questions), built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_pool_dir(world, tmp_path_factory):
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from icl.pool import PoolConfig, build_pool

    out = tmp_path_factory.mktemp("icl") / "pool"
    build_pool(PoolConfig(format="synth", inputs=[str(world["data_root"])], out=str(out),
                          clip=ClipSpec(model="tuna-tiny-clip"), index=IndexConfig(n_eval_queries=10)),
               progress=False)
    return out
