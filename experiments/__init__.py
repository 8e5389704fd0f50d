"""Users' entry points: `python -m experiments.train` (LightningCLI), `experiments.train_digits`."""
