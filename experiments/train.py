"""`python -m experiments.train` (from a clone) is `manualbp-train`: see manualbp/lightning/cli.py.

    python -m experiments.train fit --config digits    # = manualbp-train fit --config digits
"""

from manualbp.lightning.cli import ManualBPCLI, default_loggers, main

__all__ = ["ManualBPCLI", "default_loggers", "main"]

if __name__ == "__main__":
    main()
