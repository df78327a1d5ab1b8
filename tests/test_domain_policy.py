from balloonctl.config import Settings
from balloonctl.domain_policy import NAMESPACE, resolve
from balloonctl.policy import Metric
from balloonctl.units import MIB


def domain_xml(metadata: str = "", devices: str = "", backing: str = "") -> str:
    return f"""<domain type='kvm'>
  <name>web1</name>
  <metadata>{metadata}</metadata>
  <memory unit='KiB'>2097152</memory>
  {backing}
  <devices>{devices}<memballoon model='virtio'/></devices>
</domain>"""


def policy_element(body: str = "", managed: str | None = None) -> str:
    attribute = f" managed='{managed}'" if managed else ""
    return f"<b:policy xmlns:b='{NAMESPACE}'{attribute}>{body}</b:policy>"


def test_plain_domain_gets_global_settings() -> None:
    policy = resolve("web1", domain_xml(), Settings())

    assert policy.state == "managed"
    assert policy.params is not None
    assert policy.params.min_unused == 100 * MIB
    assert policy.params.metric is Metric.UNUSED
    assert policy.sources == ()


def test_metadata_overrides_config_section_overrides_global() -> None:
    settings = Settings(
        domains={"web1": {"min_unused": 200 * MIB, "max_release": 20 * MIB}}
    )
    metadata = policy_element(
        "<b:min_unused>300 MiB</b:min_unused><b:metric>usable</b:metric>"
    )

    policy = resolve("web1", domain_xml(metadata), settings)

    assert policy.params is not None
    assert policy.params.min_unused == 300 * MIB
    assert policy.params.max_release == 20 * MIB
    assert policy.params.metric is Metric.USABLE
    assert policy.params.min_release == Settings().min_release
    assert policy.sources == ("metadata", "config")


def test_metadata_can_switch_management_off() -> None:
    policy = resolve("web1", domain_xml(policy_element(managed="no")), Settings())

    assert policy.state == "excluded"
    assert "metadata" in policy.reason


def test_config_section_can_switch_management_off() -> None:
    settings = Settings(domains={"web1": {"managed": False}})

    policy = resolve("web1", domain_xml(), settings)

    assert policy.state == "excluded"
    assert "config section" in policy.reason


def test_metadata_managed_wins_over_exclude_pattern() -> None:
    settings = Settings(exclude=("web*",))

    plain = resolve("web1", domain_xml(), settings)
    forced = resolve("web1", domain_xml(policy_element(managed="yes")), settings)

    assert plain.state == "excluded"
    assert forced.state == "managed"


def test_include_patterns_limit_managed_domains() -> None:
    settings = Settings(include=("db-*",))

    policy = resolve("web1", domain_xml(), settings)

    assert policy.state == "excluded"
    assert "include" in policy.reason


def test_pinned_memory_is_excluded() -> None:
    cases = {
        "hostdev": domain_xml(devices="<hostdev mode='subsystem' type='pci'/>"),
        "locked": domain_xml(backing="<memoryBacking><locked/></memoryBacking>"),
        "hugepages": domain_xml(backing="<memoryBacking><hugepages/></memoryBacking>"),
        "SR-IOV": domain_xml(devices="<interface type='hostdev'/>"),
    }
    for word, xml in cases.items():
        policy = resolve("web1", xml, Settings())

        assert policy.state == "excluded", word
        assert word in policy.reason, word


def test_pinned_memory_excluded_even_if_metadata_manages() -> None:
    xml = domain_xml(
        policy_element(managed="yes"), devices="<hostdev mode='subsystem' type='pci'/>"
    )

    assert resolve("web1", xml, Settings()).state == "excluded"


def test_invalid_metadata_value_names_field_and_value() -> None:
    metadata = policy_element("<b:min_unused>lots</b:min_unused>")

    policy = resolve("web1", domain_xml(metadata), Settings())

    assert policy.state == "invalid"
    assert policy.field == "min_unused"
    assert policy.value == "lots"


def test_unknown_metadata_field_is_invalid() -> None:
    metadata = policy_element("<b:colour>blue</b:colour>")

    policy = resolve("web1", domain_xml(metadata), Settings())

    assert policy.state == "invalid"
    assert policy.field == "colour"


def test_invalid_managed_attribute() -> None:
    policy = resolve("web1", domain_xml(policy_element(managed="maybe")), Settings())

    assert policy.state == "invalid"
    assert policy.field == "managed"
    assert policy.value == "maybe"


def test_inconsistent_override_is_invalid() -> None:
    metadata = policy_element("<b:max_release>0 MiB</b:max_release>")

    policy = resolve("web1", domain_xml(metadata), Settings())

    assert policy.state == "invalid"
    assert policy.field == "max_release"


def test_other_namespace_is_ignored() -> None:
    metadata = (
        "<x:policy xmlns:x='urn:example'><x:min_unused>1 KiB</x:min_unused></x:policy>"
    )

    policy = resolve("web1", domain_xml(metadata), Settings())

    assert policy.state == "managed"
    assert policy.params is not None
    assert policy.params.min_unused == 100 * MIB


def test_malformed_xml_is_invalid_not_a_crash() -> None:
    policy = resolve("web1", "<domain><metadata>", Settings())

    assert policy.state == "invalid"
    assert "not valid" in policy.reason


def test_oversized_xml_is_rejected() -> None:
    huge = domain_xml(metadata="<!--" + "x" * (11 * 1024 * 1024) + "-->")

    policy = resolve("web1", huge, Settings())

    assert policy.state == "invalid"
    assert "too large" in policy.reason


def test_entity_expansion_is_not_followed() -> None:
    hostile = (
        "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'>"
        "<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
        "<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>]>"
        f"<domain><metadata>{policy_element('<b:metric>&c;</b:metric>')}</metadata>"
        "<devices/></domain>"
    )

    policy = resolve("web1", hostile, Settings())

    assert policy.state == "invalid"
    assert "DTD" in policy.reason
    assert "aaaa" not in policy.reason
