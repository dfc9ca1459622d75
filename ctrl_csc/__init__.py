"""ctrl_csc: closed-loop transcription via convolutional sparse coding (CSC-CTRL)."""

__version__ = "0.1.0"
