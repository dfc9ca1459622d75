"""ctrl_csc: closed-loop transcription via convolutional sparse coding (CSC-CTRL)."""

__version__ = "0.1.0"


def load_pretrained(path_or_name, device="cpu"):
    """``(model, config)`` of a released model or checkpoint; see :mod:`ctrl_csc.pretrained`."""
    from ctrl_csc.pretrained import load_pretrained as _load

    return _load(path_or_name, device)
