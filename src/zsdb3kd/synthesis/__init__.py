"""Zero-shot inputs: random images (:mod:`.noise`) and the paper's pseudo samples pushed
away from the teacher's boundaries (:mod:`.push`). No real data is read here."""

from .noise import NOISE_KINDS, draw_noise, label_random_images, random_images
from .push import (PseudoSamples, SynthesisError, SynthesisFields, SynthesisSettings, sample_class_noise, synthesize,
                   synthesize_to_file, untargeted_search)

__all__ = ["NOISE_KINDS", "PseudoSamples", "SynthesisError", "SynthesisFields", "SynthesisSettings", "draw_noise",
           "label_random_images", "random_images", "sample_class_noise", "synthesize", "synthesize_to_file",
           "untargeted_search"]
