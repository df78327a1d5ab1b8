"""balloonctl: keep each libvirt guest's unused memory near a buffer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("balloonctl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
