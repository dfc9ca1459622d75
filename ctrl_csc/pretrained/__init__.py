"""Released checkpoints shipped with the package (safetensors + config)."""
