"""Datastore build: counts, planted neighbours, resume, bad input, scale-out, encoder mismatch."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datastore import layout
from tests.datastore.conftest import build_config, cut_shard, member_offsets, sample_image, write_shards

REPO = Path(__file__).resolve().parents[2]


def read_store(root: Path) -> tuple[list[str], list[list[str]], np.ndarray]:
    """(keys, tags, embeddings) of a built datastore in index order."""
    manifest = json.loads((root / "manifest.json").read_text())
    keys, tags, embs = [], [], []
    for part in manifest["parts"]:
        table = pq.read_table(root / part["metadata"]).to_pydict()
        keys += table["key"]
        tags += table["tags"]
        embs.append(np.load(root / part["embeddings"], allow_pickle=False))
    return keys, tags, np.concatenate(embs)


def test_manifest_counts_and_layout(built):
    root, manifest = built
    assert manifest["counts"] == {"read": 120, "written": 120, "skipped": {}}
    assert [p["part"] for p in manifest["parts"]] == [0, 1, 2, 3]
    assert manifest["dim"] == 64 and manifest["normalized"] is True
    assert manifest["clip"]["model"] == "tuna-tiny-clip" and len(manifest["clip"]["weights_sha256"]) == 64
    assert manifest["parser"]["name"] == "rule" and manifest["parser"]["version"]
    assert manifest["index"]["factory"] == "Flat" and manifest["index"]["recall_at_k"] == 1.0
    assert set(manifest["timings_s"]) == {"read", "tag", "encode", "write", "index"}
    keys, tags, emb = read_store(root)
    assert keys == [f"s{i:06d}" for i in range(120)]
    assert emb.dtype == np.float16 and emb.shape == (120, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert tags[0] == ["red blorp", "blorp", "small zinnet", "zinnet"]
    assert (root / "img_emb" / "img_emb_000003.npy").is_file()
    assert (root / "metadata" / "metadata_000003.parquet").is_file()


def test_query_returns_planted_neighbour_tags(built):
    from datastore.store import Datastore

    root, _ = built
    store = Datastore.open(root)
    top1 = store.retrieve_tags(images=[sample_image(37)], k_images=1)[0]
    assert top1.neighbours == ["s000037"] and top1.neighbour_scores[0] > 0.99
    assert top1.tags == ["green zinnet", "zinnet", "small quoffle", "quoffle"]

    result = store.retrieve_tags(images=[sample_image(37)], k_images=3, max_tags=5)[0]
    keys, tags, _ = read_store(root)
    expected: dict[str, float] = {}
    for key, sim in zip(result.neighbours, result.neighbour_scores):
        for tag in tags[keys.index(key)]:
            expected[tag] = expected.get(tag, 0.0) + sim
    ranked = sorted(expected, key=lambda t: -expected[t])[:5]
    assert result.tags == ranked
    np.testing.assert_allclose(result.scores, [expected[t] for t in ranked], atol=1e-5)


def test_unreadable_shard_is_a_one_line_error(tmp_path, corpus):
    from datastore.build import build
    from datastore.reader import ShardError

    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardError, match=r"cannot read shard .*broken\.tar"):
        build(build_config([corpus[0], str(broken)], tmp_path / "out"), show_progress=False)
    with pytest.raises(ShardError, match="input shard not found: .*nope.tar"):
        build(build_config([str(tmp_path / "nope.tar")], tmp_path / "out2"), show_progress=False)


def test_bad_samples_skipped_and_counted(tmp_path):
    from datastore.build import build

    bad = {1: "truncated_jpeg", 2: "garbage_jpeg", 3: "missing_image", 5: "missing_caption",
           8: "empty_caption", 13: "undecodable_text", 21: "garbage_jpeg"}
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=12, bad=bad)
    manifest = build(build_config(shards, tmp_path / "out"), show_progress=False)
    assert manifest["counts"]["read"] == 24
    assert manifest["counts"]["written"] == 17
    assert manifest["counts"]["skipped"] == {"corrupt_image": 3, "empty_caption": 1, "missing_caption": 1,
                                             "missing_image": 1, "undecodable_text": 1}
    keys, _, _ = read_store(tmp_path / "out")
    assert not {f"s{i:06d}" for i in bad} & set(keys)


def test_different_clip_in_same_out_dir_is_an_error(tmp_path, corpus):
    from datastore.build import BuildError, build
    from datastore.clip import ClipSpec

    out = tmp_path / "out"
    build(build_config(corpus[:1], out, merge=False), show_progress=False)
    other = tmp_path / "tuna-tiny-clip-narrow.json"  # a narrower tower -> different weights
    config = json.loads((REPO / "datastore/model_configs/tuna-tiny-clip.json").read_text())
    config["vision_cfg"]["width"] = 32
    other.write_text(json.dumps(config))
    cfg = build_config(corpus[:1], out)
    cfg.clip = ClipSpec(model_config=str(other))
    with pytest.raises(BuildError, match="built with a different CLIP model: expected tuna-tiny-clip"):
        build(cfg, show_progress=False)


def test_overwrite_refuses_a_directory_that_is_not_a_datastore(tmp_path, corpus):
    from datastore.build import BuildError, build

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(BuildError, match="refusing to --overwrite .*holds no tuna datastore"):
        build(build_config(corpus[:1], precious, overwrite=True), show_progress=False)
    assert (precious / "thesis.tex").read_text() == "keep me"
    out = tmp_path / "ds"
    build(build_config(corpus[:1], out, merge=False), show_progress=False)
    (out / "stale.txt").write_text("old")
    build(build_config(corpus[:1], out, overwrite=True), show_progress=False)
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()


def test_model_config_cannot_shadow_a_registered_architecture(tmp_path):
    from datastore.clip import ClipSpec, load_clip

    clash = tmp_path / "tuna-tiny-clip.json"
    config = json.loads((REPO / "datastore/model_configs/tuna-tiny-clip.json").read_text())
    config["embed_dim"] = 32
    clash.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different config is already registered under that name"):
        load_clip(ClipSpec(model_config=str(clash)))


def test_query_with_other_clip_is_an_error(built, tmp_path):
    from datastore.clip import ClipSpec
    from datastore.store import Datastore, DatastoreError

    root, _ = built
    other = tmp_path / "other-clip.json"
    other.write_text((REPO / "datastore/model_configs/tuna-tiny-clip.json").read_text())
    with pytest.raises(DatastoreError, match="different CLIP model: expected tuna-tiny-clip"):
        Datastore.open(root, clip=ClipSpec(model_config=str(other)))


def _cli_build(inputs, out, *extra):
    return [sys.executable, "-m", "datastore.cli", "build", "--input", *inputs, "--out", str(out),
            "--model", "tuna-tiny-clip", "--device", "cpu", "--batch-size", "8", "--num-workers", "1", *extra]


def test_kill_and_resume_equals_clean_build(tmp_path):
    from datastore.build import build

    shards = write_shards(tmp_path / "in", n_shards=8, per_shard=48)
    clean = tmp_path / "clean"
    build(build_config(shards, clean), show_progress=False)

    out = tmp_path / "resumed"
    proc = subprocess.Popen(_cli_build(shards, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("part_*.json"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "parts").glob("part_*.json")))
    assert 2 <= done_before < 8, "the kill should land in the middle of the build"
    assert not (out / "manifest.json").exists()
    result = subprocess.run(_cli_build(shards, out), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stderr
    keys_a, tags_a, emb_a = read_store(clean)
    keys_b, tags_b, emb_b = read_store(out)
    assert keys_a == keys_b and len(set(keys_b)) == 8 * 48
    assert tags_a == tags_b
    np.testing.assert_array_equal(emb_a, emb_b)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"read": 384, "written": 384, "skipped": {}}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_build_equals_one_process(tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=5, per_shard=10)
    one, two = tmp_path / "one", tmp_path / "two"
    result = subprocess.run(_cli_build(shards, one), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())]
    result = subprocess.run(torchrun + _cli_build(shards, two)[1:], cwd=REPO, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    keys_a, tags_a, emb_a = read_store(one)
    keys_b, tags_b, emb_b = read_store(two)
    assert keys_a == keys_b and tags_a == tags_b
    np.testing.assert_allclose(emb_a.astype(np.float32), emb_b.astype(np.float32), atol=2e-3)
    markers = [json.loads(p.read_text()) for p in sorted((two / "parts").glob("*.json"))]
    assert len(markers) == 5


def test_merge_reports_missing_parts(tmp_path, corpus):
    from datastore.build import build
    from datastore.merge import MergeError, merge

    out = tmp_path / "out"
    build(build_config(corpus[:3], out, rank=0, world_size=2), show_progress=False)  # parts 0 and 2 only
    assert layout.marker_path(out, 0).exists() and not layout.marker_path(out, 1).exists()
    with pytest.raises(MergeError, match=r"1 of 3 parts are not built yet: 1 \("):
        merge(out)
    assert build(build_config(corpus[:3], out, rank=1, world_size=2), show_progress=False) is None
    manifest = merge(out)
    assert manifest["counts"]["written"] == 90


def test_fsspec_urls_and_json_caption_key(tmp_path, corpus):
    from datastore.build import build
    from datastore.merge import MergeError
    from datastore.reader import ReaderConfig

    url = "file://" + str(Path(corpus[0]).parent) + "/shard-{000000..000001}.tar"
    manifest = build(build_config([url], tmp_path / "out"), show_progress=False)
    assert manifest["counts"] == {"read": 60, "written": 60, "skipped": {}}
    assert manifest["parts"][1]["shard"].startswith("file://")
    # captions from a JSON field: a non-string field is counted as undecodable, never dropped silently
    reader = ReaderConfig(caption_key="json:i", batch_size=7, num_workers=0)
    with pytest.raises(MergeError, match="no sample was written"):
        build(build_config([url], tmp_path / "out2", reader=reader), show_progress=False)
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "out2" / "parts").glob("*.json"))]
    assert [m["skipped"] for m in markers] == [{"undecodable_text": 30}] * 2


def test_saved_checkpoint_loads_with_same_identity(tmp_path, tiny_clip):
    from common.files import sha256_file
    from datastore.clip import ClipSpec, load_clip, same_clip, save_checkpoint

    for name in ("clip.safetensors", "clip.pt"):
        path = save_checkpoint(tiny_clip, str(tmp_path / name))
        loaded = load_clip(ClipSpec(model="tuna-tiny-clip", pretrained=path))
        assert same_clip(loaded.identity, tiny_clip.identity)
        assert loaded.identity["checkpoint_sha256"] == sha256_file(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_clip(ClipSpec(model="tuna-tiny-clip", pretrained=str(tmp_path / "missing.pt")))


def _cuts(shard: str) -> dict[str, int]:
    """Where a partial copy of a 10-sample test shard can end (3 members per sample)."""
    offsets, size = member_offsets(shard), Path(shard).stat().st_size
    last = offsets[-1] + 512 + len(b"x")  # inside the data of the last member
    return {"at_a_header": offsets[9], "inside_a_header": offsets[9] + 100, "inside_data": offsets[9] + 512 + 100,
            "inside_the_last_member": last, "before_the_end_blocks": _end_of_members(shard),
            "after_one_end_block": _end_of_members(shard) + 512, "intact": size}


def _end_of_members(shard: str) -> int:
    import tarfile

    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("where", ["at_a_header", "inside_a_header", "inside_data", "inside_the_last_member",
                                   "before_the_end_blocks", "after_one_end_block", "intact"])
def test_a_cut_shard_is_reported_as_truncated(tmp_path, where):
    from datastore import reader
    from datastore.reader import ShardError, iter_raw_samples

    shard = write_shards(tmp_path / "in", n_shards=1, per_shard=10)[0]
    n_bytes = _cuts(shard)[where]
    cut = str(cut_shard(shard, tmp_path / "cut" / "shard.tar", n_bytes))
    if where == "intact":
        assert len(list(iter_raw_samples(cut))) == 10
    else:  # a caller that does not count truncations gets an error after the complete samples
        with pytest.raises(ShardError, match=r"shard .*shard\.tar is truncated: the file ends"):
            list(iter_raw_samples(cut))
    status = reader.ShardStatus(cut)  # the build counts it instead
    keys = [s["__key__"] for s in iter_raw_samples(cut, status)]
    complete = {"at_a_header": 3, "inside_a_header": 3, "inside_data": 3}.get(where, 10)
    assert keys[:complete] == [f"s{i:06d}" for i in range(complete)] and len(keys) <= complete + 1
    assert (status.truncated is None) == (where == "intact")


def test_truncated_shard_is_counted_and_redone_once_repaired(tmp_path, caplog):
    """A shard cut at a tar header boundary used to read as a normal end of file: no skip reported, and a
    resumed build kept the short part after the shard was repaired."""
    from datastore.build import build
    from datastore.cli import summarize

    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=10)
    intact = Path(shards[1]).read_bytes()
    cut_shard(shards[1], Path(shards[1]), member_offsets(shards[1])[9])  # 3 samples left, as `head -c`
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="datastore"):
        manifest = build(build_config(shards, out), show_progress=False)
    assert manifest["counts"] == {"read": 13, "written": 13, "skipped": {"truncated_shard": 1}}
    assert "shard-000001.tar is truncated" in caplog.text
    assert manifest["parts"][1]["truncated"] and "truncated" not in manifest["parts"][0]
    text = summarize(manifest, str(out))
    assert "skipped: truncated_shard 1" in text and "truncated shards" in text and "shard-000001.tar" in text

    Path(shards[1]).write_bytes(intact)  # repaired: the resumed build redoes part 1, keeps part 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datastore"):
        manifest = build(build_config(shards, out), show_progress=False)
    assert "redoing part 000001: shard" in caplog.text and "changed since the part was built" in caplog.text
    assert "redoing part 000000" not in caplog.text and "(1 already done)" in caplog.text
    assert manifest["counts"] == {"read": 20, "written": 20, "skipped": {}}
    keys, _, _ = read_store(out)
    assert keys == [f"s{i:06d}" for i in range(20)]


def test_damaged_part_files_are_named_and_redone_on_resume(tmp_path, caplog):
    from datastore.build import build
    from datastore.merge import MergeError, merge

    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=8)
    out = tmp_path / "out"
    build(build_config(shards, out, merge=False), show_progress=False)
    emb = layout.emb_path(out, 1)
    emb.write_bytes(emb.read_bytes()[:-256])  # a partial copy of the part's embeddings
    with pytest.raises(MergeError, match=r"img_emb_000001\.npy: \d+ bytes, \d+ recorded"):
        merge(out)
    with caplog.at_level(logging.WARNING, logger="datastore"):
        manifest = build(build_config(shards, out), show_progress=False)
    assert "redoing part 000001" in caplog.text and "img_emb_000001.npy" in caplog.text
    assert manifest["counts"]["written"] == 16
    for part in manifest["parts"]:
        for name in ("embeddings", "metadata"):
            assert part["files"][name]["bytes"] == (out / part[name]).stat().st_size
            assert len(part["files"][name]["sha256"]) == 64


def test_tiny_datastore_merges_with_a_smaller_recall_k(tmp_path, caplog):
    from datastore.build import build

    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=6)
    with caplog.at_level(logging.WARNING, logger="datastore"):
        manifest = build(build_config(shards, tmp_path / "out"), show_progress=False)
    assert manifest["counts"]["written"] == 6
    assert manifest["index"]["k"] == 5 and manifest["index"]["recall_at_k"] == 1.0
    assert "only 6 vectors: measuring leave-one-out recall@5 instead of recall@10" in caplog.text
