"""ComfyUI entry point of the EMO node pack.

Kept light on purpose: importing the pack must be fast and must not touch the GPU.
The nodes live in `nodes/`; the model code in `emo_core/` never imports ComfyUI.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
