"""The CMA-CLIP model: `CMAClip(config, tasks)`, its config and its output (see ARCHITECTURE.md)."""
from cmaclip.model.cmaclip import CMAClip, CMAClipOutput
from cmaclip.model.config import FUSIONS, PRESETS, ModelConfig

__all__ = ["CMAClip", "CMAClipOutput", "ModelConfig", "FUSIONS", "PRESETS"]
