"""The plan's errors: `PlanError`, and `RefusedError` with its `Refusal` when the compiler refuses
a program for lack of device memory."""

from typing import NamedTuple, Optional

from arca_jax.errors import ConfigError


class PlanError(ConfigError):
    """Input plan cannot work with (unknown topology, no libtpu, a mesh that does not divide)."""


class Refusal(NamedTuple):
    """A program the compiler refused for lack of device memory (RESOURCE_EXHAUSTED): its name,
    the compiler's RESOURCE_EXHAUSTED line, and the bytes per device it said the program uses
    and has (libtpu's "Used 34.83G of 15.75G hbm"; None when the message gives no figure)."""

    program: str
    message: str
    used_bytes: Optional[int]
    available_bytes: Optional[int]


class RefusedError(PlanError):
    """The compiler refused a program for lack of device memory: it does not fit (`refusal`)."""

    def __init__(self, refusal: Refusal):
        super().__init__(f"does not fit: the compiler refused {refusal.program} for lack of "
                         f"device memory ({refusal.message}); try more microbatches, a larger "
                         "tensor axis or remat (--mesh, --set train.microbatches=...)")
        self.refusal = refusal
