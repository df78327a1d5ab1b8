import pytest

from tests.logcapture import LogCapture, capture_logs


@pytest.fixture
def logs() -> LogCapture:
    """balloonctl's JSON log lines, as written by its real structlog set-up."""
    return capture_logs()
