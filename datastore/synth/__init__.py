"""Embedded synthetic world: named shape+pattern categories, rendered scenes, corpus/instruction/eval files."""

from datastore.synth.generate import SynthConfig, generate_world
from datastore.synth.scene import Sample, Scene, SceneObject, render_sample, render_scene
from datastore.synth.world import Category, WorldCatalogue, catalogue_entry

__all__ = [
    "Category", "Sample", "Scene", "SceneObject", "SynthConfig", "WorldCatalogue", "catalogue_entry",
    "generate_world", "render_sample", "render_scene",
]
