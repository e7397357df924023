"""ComfyUI nodes of the EMO pack: thin adapters over `emo_core` (see ../shared/DESIGN.md section 3)."""
