"""``python -m ctrl_csc.train`` — the same as ``ctrl-csc-train`` (also under torchrun)."""

from ctrl_csc.cli.train import main

if __name__ == "__main__":
    main()
