"""A relative checkpoint path is stored absolute, so manifests written with it work from any folder."""

from __future__ import annotations

import os

from datastore.clip import ClipSpec, load_clip, same_clip, save_checkpoint, spec_from_dict


def test_relative_pretrained_path_is_stored_absolute(tmp_path, monkeypatch):
    loaded = load_clip(ClipSpec(model="tuna-tiny-clip"))
    (tmp_path / "clip").mkdir()
    save_checkpoint(loaded, str(tmp_path / "clip" / "tiny.safetensors"))
    monkeypatch.chdir(tmp_path)
    spec = ClipSpec(model="tuna-tiny-clip", pretrained=os.path.join("clip", "tiny.safetensors"))
    assert spec.pretrained == str(tmp_path / "clip" / "tiny.safetensors")
    stored = spec.to_dict()  # what a datastore / pool manifest keeps
    monkeypatch.chdir("/")
    again = load_clip(spec_from_dict(stored))
    assert same_clip(again.identity, loaded.identity)
    assert ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"  # a tag
