"""Shards by http(s) URL (fsspec's HTTP filesystem, aiohttp) and the up-front check of every input."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from tests.datastore.conftest import build_config, write_shards
from tests.datastore.test_build import read_store


@pytest.fixture()
def served(tmp_path):
    """(base URL, shard paths): two shards served by a local HTTP server."""
    shards = write_shards(tmp_path / "www", n_shards=2, per_shard=12)
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", shards
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_shards_build_the_same_datastore_as_local_files(served, tmp_path):
    from datastore.build import build

    base, shards = served
    build(build_config(shards, tmp_path / "local"), show_progress=False)
    manifest = build(build_config([f"{base}/shard-{{000000..000001}}.tar"], tmp_path / "remote"),
                     show_progress=False)
    assert manifest["counts"] == {"read": 24, "written": 24, "skipped": {}}
    keys_a, tags_a, emb_a = read_store(tmp_path / "local")
    keys_b, tags_b, emb_b = read_store(tmp_path / "remote")
    assert keys_a == keys_b and tags_a == tags_b
    np.testing.assert_array_equal(emb_a, emb_b)


def test_an_unreachable_input_stops_the_build_before_any_part_is_encoded(served, tmp_path):
    from datastore.build import build
    from datastore.reader import ShardError

    base, shards = served
    out = tmp_path / "ds"
    missing = f"{base}/shard-000009.tar"
    with pytest.raises(ShardError, match=f"cannot stat shard {missing}"):
        build(build_config([*shards, missing], out), show_progress=False)
    assert not list(out.glob("parts/part_*"))  # nothing was encoded before the check
