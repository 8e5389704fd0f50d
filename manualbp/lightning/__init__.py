"""Lightning pieces for training MLPs with manualbp's hand-written backward (or natively, to compare).

    from manualbp.lightning import DigitsDataModule, MLPClassifier, GradientParityCallback

DataModules (no downloads): `DigitsDataModule`, `RegressionDataModule`, `LinearNeuronDataModule`;
their train loader, `ResumableLoader`, resumes mid-epoch exactly from a Lightning checkpoint.
LightningModules: `MLPClassifier`, `MLPRegressor` (backend "manual" or "native", same init).
Callbacks: `GradientParityCallback`, `SavedActivationMemoryCallback`.
"""

from manualbp.lightning.callbacks import (
    DEFAULT_PARITY_THRESHOLDS,
    GradientParityCallback,
    SavedActivationMemoryCallback,
    gradient_parity,
)
from manualbp.lightning.data import (
    DigitsDataModule,
    LinearNeuronDataModule,
    RegressionDataModule,
    ResumableLoader,
)
from manualbp.lightning.modules import MLPClassifier, MLPRegressor, NativeMLP

__all__ = [
    "DEFAULT_PARITY_THRESHOLDS",
    "DigitsDataModule",
    "GradientParityCallback",
    "LinearNeuronDataModule",
    "MLPClassifier",
    "MLPRegressor",
    "NativeMLP",
    "RegressionDataModule",
    "ResumableLoader",
    "SavedActivationMemoryCallback",
    "gradient_parity",
]
