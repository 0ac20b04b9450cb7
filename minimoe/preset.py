"""Named configurations for the whole run: which model to build, how long to pretrain it, how hard to push GRPO.

A preset is a set of overrides, one dict per section ("model", "pretrain", "grpo"), applied over the library's
dataclass defaults (`ModelConfig`, `PretrainConfig`, `GRPOConfig`); a `--config` file goes on top of the preset.

    v3       DeepSeek-V3's architecture in miniature (`presets/v3.json`), the demo's default: Multi-head Latent
             Attention (latent 64, an 8-dimensional RoPE key, RoPE base 100), a sigmoid gate over 8 routed experts
             plus 1 shared with normalised top-2 weights and auxiliary-loss-free balancing; 1,100 pretraining
             steps; GRPO at 5e-4 → 5e-5. Through the demo, seeds 0–4: pass@1 0.14–0.15 → 0.93–0.97 after GRPO.
    classic  the dataclass defaults as they are: multi-head attention and a softmax gate, 1,000 pretraining
             steps, GRPO at 1e-3 → 1e-4 (the demo's default until the V3 preset met its targets; every figure
             measured on `lessons/data/base_addition3` comes from it).

Why these numbers: lesson 08 §8 (MLA's read-back of the column sums needs the RoPE part of the score; a sigmoid
gate with route scale 1 and one group learns as fast as a dense layer; MLA's policy moves about twice as far per
GRPO step as MHA's, so GRPO takes half the step).
"""

import json
import os

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
PRESETS = ("v3", "classic")
DEFAULT_PRESET = "v3"
SECTIONS = ("model", "pretrain", "grpo")


def load_preset(name):
    """{"model": {...}, "pretrain": {...}, "grpo": {...}}: the preset's overrides of each section's defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {list(PRESETS)}")
    overrides = {}
    if name != "classic":  # classic: the dataclass defaults, nothing to override
        with open(os.path.join(PRESET_DIR, f"{name}.json")) as file:
            overrides = json.load(file)
    return {section: dict(overrides.get(section, {})) for section in SECTIONS}
