"""Layers: the module system, attention, experts and routing."""

from .module import (Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter, RMSNorm, init_normal,
                     init_uniform)
from .attention import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
