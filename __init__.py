"""ComfyUI entry point of the EMO node pack.

Kept light on purpose: importing the pack must be fast and must not touch the GPU. The nodes (V3 schema) live in
`nodes/`; the model code in `emo_core/` never imports ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import EMOExtension

    return EMOExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
