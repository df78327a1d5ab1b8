"""Domains on libvirt's test driver, and readings of a child process.

A test driver file (``test:///ABS/PATH.xml``) whose ``<node>`` contains N
``<domain>`` elements starts with N running domains, which is how the cost
and memory benchmarks reach 2000 domains: opening the file takes under a
second, while 2000 ``createXML`` calls go through the lifecycle events of
every listener. The in-process benchmarks use ``createXML`` on
``test:///default`` instead, because they need the domains' start events.
"""

import os
import uuid
from pathlib import Path

# The test driver reports unused as half of actual. At 200 MiB of 512 MiB,
# unused is the 100 MiB buffer, so the policy keeps the domain as it is and
# every period costs the same calls: info and memoryStats, no setMemoryFlags.
STEADY_MAXIMUM_MIB = 512
STEADY_CURRENT_MIB = 200


def domain_xml(
    name: str,
    *,
    maximum_mib: int = STEADY_MAXIMUM_MIB,
    current_mib: int = STEADY_CURRENT_MIB,
) -> str:
    """Return a test driver domain with a virtio balloon."""
    return f"""<domain type='test'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{maximum_mib}</memory>
  <currentMemory unit='MiB'>{current_mib}</currentMemory>
  <os><type>hvm</type></os>
  <devices><memballoon model='virtio'/></devices>
</domain>"""


def write_node(directory: Path, count: int, prefix: str = "bench") -> str:
    """Write a test driver file with ``count`` running domains; return its URI."""
    path = (directory / f"node-{count}.xml").resolve()
    domains = [domain_xml(f"{prefix}-{index:05d}") for index in range(count)]
    path.write_text("<node>\n" + "\n".join(domains) + "\n</node>\n")
    return f"test://{path}"


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time of every thread of ``pid`` so far.

    The sum of the threads' ``schedstat`` run times has nanosecond
    resolution; ``/proc/PID/stat`` (utime + stime, in clock ticks) is the
    fallback on kernels without schedstat.
    """
    total_ns = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total_ns += int(schedstat.read().split()[0])
        return total_ns / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as stat:
        # The command name in field 2 may contain spaces; it ends at ")".
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def resident_kib(pid: int) -> int:
    """Return the resident set size of ``pid`` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line in /proc/{pid}/status")
