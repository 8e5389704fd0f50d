"""Lightning pieces for training MLPs with manualbp's hand-written backward (or natively, to compare).

    from manualbp.lightning import DigitsDataModule, MLPClassifier, GradientParityCallback

DataModules (no downloads): `DigitsDataModule`, `RegressionDataModule`, `LinearNeuronDataModule`;
their train loader, `ResumableLoader`, resumes mid-epoch exactly from a Lightning checkpoint.
LightningModules: `MLPClassifier`, `MLPRegressor` (backend "manual" or "native", same init).
Callbacks: `GradientParityCallback`, `SavedActivationMemoryCallback`.
The `manualbp-train` command: :mod:`manualbp.lightning.cli`.

Needs the 'lightning' extra: ``pip install manualbp[lightning]``.
"""

try:
    import lightning.pytorch  # noqa: F401
    import torchmetrics  # noqa: F401
except ImportError as _err:
    raise ImportError(
        f"manualbp.lightning needs the 'lightning' extra ({_err.name} is not installed): "
        "pip install manualbp[lightning]"
    ) from _err

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
