"""The few errors the hypervisor seam raises; libvirt's are translated once."""


class HypervisorError(Exception):
    """A hypervisor call failed. ``code`` is libvirt's error code, if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class DomainGone(HypervisorError):
    """The domain no longer exists."""


class DomainNotRunning(HypervisorError):
    """The domain exists but is not running, so it has no live memory."""


class CallTimedOut(HypervisorError):
    """A call did not return within the call timeout."""


class CallStillRunning(CallTimedOut):
    """A call was not made because an earlier one for the domain has not returned."""


class Disconnected(HypervisorError):
    """The connection to the hypervisor is closed or broken."""


class Unsupported(HypervisorError):
    """The hypervisor driver does not implement the call."""
