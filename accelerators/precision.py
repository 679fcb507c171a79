"""CerebrasPrecision: Lightning's precision setting mapped onto ``cstorch.amp``."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from lightning.pytorch.plugins.precision import Precision

SUPPORTED = ("32-true", "bf16-mixed")


class CerebrasPrecision(Precision):
    """``"32-true"``: float32 throughout; ``"bf16-mixed"``: bfloat16 compute under ``cstorch.amp.autocast``.

    bfloat16 keeps float32's exponent range, so no loss scaling is needed (CSX's float16 default
    would need a ``cstorch.amp.GradScaler``; it is not offered here).
    """

    def __init__(self, precision: str = "32-true") -> None:
        precision = str(precision)
        if precision in ("32", "32-true"):
            precision = "32-true"
        elif precision in ("bf16", "bf16-mixed"):
            precision = "bf16-mixed"
        else:
            raise ValueError(
                f'Trainer(accelerator="cerebras") supports precision "32-true" or "bf16-mixed", got '
                f"{precision!r}; set trainer.precision to one of them"
            )
        self.precision = precision

    def check_backend(self, backend_type: str) -> None:
        """CS-X always runs mixed precision, with float16 as its default half type
        (``cstorch.amp.set_half_dtype``); "32-true" there would silently mean float16 without loss scaling."""
        if backend_type == "CSX" and self.precision != "bf16-mixed":
            from gigagpt.accelerators.bridge_errors import CerebrasError

            raise CerebrasError(
                f'precision "{self.precision}" on a Cerebras cluster would run float16 without loss scaling '
                "(CS-X always computes in a half type, float16 unless told otherwise); set "
                "trainer.precision: bf16-mixed"
            )

    def configure(self) -> None:
        """Set cstorch's half type (call once the backend exists)."""
        if self.precision == "bf16-mixed":
            import cerebras.pytorch as cstorch

            cstorch.amp.set_half_dtype("bfloat16")

    def _autocast(self):
        if self.precision != "bf16-mixed":
            return nullcontext()
        import cerebras.pytorch as cstorch

        return cstorch.amp.autocast()

    @contextmanager
    def forward_context(self):
        with self._autocast():
            yield
