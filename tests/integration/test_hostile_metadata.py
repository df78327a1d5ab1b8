"""Hostile domain XML through libvirt's test driver: only that domain is skipped.

libvirt's own parser decides what reaches balloonctl. On libvirt 9.0 it
rejects a DTD in virDomainSetMetadata, but accepts one in a domain's XML,
drops the DTD and keeps the entity references, so XMLDesc returns entities
that nothing defines.
"""

import asyncio
from pathlib import Path
from typing import Any

import libvirt
import pytest

from balloonctl.domain_policy import MAX_XML_BYTES, NAMESPACE
from tests.integration.conftest import RunningController

pytestmark = pytest.mark.asyncio


def hostile_domain(name: str, dtd: str, value: str) -> str:
    return f"""{dtd}<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <os><type>hvm</type></os>
  <metadata>
    <b:policy xmlns:b='{NAMESPACE}'><b:min_unused>{value}</b:min_unused></b:policy>
  </metadata>
  <devices><memballoon model='virtio'/></devices>
</domain>"""


def set_policy(dom: Any, xml: str) -> None:
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        xml,
        "bctl",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )


async def assert_only_that_domain_skipped(
    running: RunningController, name: str
) -> dict[str, Any]:
    invalid = await running.logs.wait_event("policy_invalid", domain=name)
    released = len(running.logs.events("memory_released", domain=name))
    good = await running.create(f"{name}-neighbour")
    await running.logs.wait_event("memory_released", domain=f"{name}-neighbour")
    await asyncio.sleep(1.5)

    assert len(running.logs.events("memory_released", domain=name)) == released
    assert not [line for line in running.logs.lines if line["level"] == "error"]
    assert good.UUIDString() in {ref.uuid for ref in running.controller.domains}
    return invalid


async def test_entities_in_domain_xml_skip_the_domain(
    running: RunningController, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("300 MiB")
    laughs = (
        "<!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'>"
        "<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
        f"<!ENTITY x SYSTEM '{secret.as_uri()}'>]>"
    )
    xml = hostile_domain("bctl-entities", laughs, "&x;&b;")
    dom = await asyncio.to_thread(running.conn.createXML, xml, 0)

    invalid = await assert_only_that_domain_skipped(running, "bctl-entities")

    assert "undefined entity" in invalid["error"]
    assert not running.logs.events("memory_released", domain="bctl-entities")
    assert not running.logs.events("stats_period_set", domain="bctl-entities")
    assert "300" not in invalid["error"]
    assert "DOCTYPE" not in await asyncio.to_thread(dom.XMLDesc, 0)


async def test_libvirt_rejects_dtd_in_set_metadata(
    running: RunningController, tmp_path: Path
) -> None:
    dom = await running.create("bctl-dtd-metadata")
    await running.logs.wait_event("policy_applied", domain="bctl-dtd-metadata")
    secret = tmp_path / "secret.txt"
    secret.write_text("300 MiB")
    hostile = (
        f"<!DOCTYPE policy [<!ENTITY x SYSTEM '{secret.as_uri()}'>]>"
        "<policy><min_unused>&x;</min_unused></policy>"
    )

    with pytest.raises(libvirt.libvirtError):
        await asyncio.to_thread(set_policy, dom, hostile)

    await asyncio.sleep(1.5)
    applied = running.logs.events("policy_applied", domain="bctl-dtd-metadata")
    assert [line["min_unused_kib"] for line in applied] == [100 * 1024]


async def test_oversized_metadata_skips_the_domain(
    running: RunningController,
) -> None:
    dom = await running.create("bctl-oversized")
    await running.logs.wait_event("policy_applied", domain="bctl-oversized")
    huge = f"<policy><colour>{'x' * MAX_XML_BYTES}</colour></policy>"

    await asyncio.to_thread(set_policy, dom, huge)

    invalid = await assert_only_that_domain_skipped(running, "bctl-oversized")
    assert "too large" in invalid["error"]


async def test_malformed_metadata_rejected_by_libvirt(
    running: RunningController,
) -> None:
    dom = await running.create("bctl-malformed")

    for bad in ("<policy><min_unused>1 MiB</policy>", "<policy>&x;</policy>"):
        with pytest.raises(libvirt.libvirtError) as info:
            await asyncio.to_thread(set_policy, dom, bad)

        assert info.value.get_error_code() == libvirt.VIR_ERR_XML_DETAIL
