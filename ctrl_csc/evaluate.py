"""``python -m ctrl_csc.evaluate`` — the same as ``ctrl-csc-eval``."""

from ctrl_csc.cli.evaluate import main

if __name__ == "__main__":
    main()
