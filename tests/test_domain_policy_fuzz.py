"""Hostile and malformed domain XML: the domain is invalid, nothing is expanded.

Values in a domain's XML come from whoever can define the domain, so
resolve() must return a DomainPolicy for any text and never raise, read a
file or expand an entity.
"""

import string
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from balloonctl.config import Settings
from balloonctl.domain_policy import MAX_XML_BYTES, NAMESPACE, resolve
from balloonctl.units import MIB
from tests.test_domain_policy import domain_xml, policy_element


def billion_laughs(levels: int = 9) -> str:
    entities = ["<!ENTITY l0 'lol'>"]
    for level in range(1, levels + 1):
        entities.append(f"<!ENTITY l{level} '{f'&l{level - 1};' * 10}'>")
    body = policy_element(f"<b:metric>&l{levels};</b:metric>")
    return f"<!DOCTYPE domain [{''.join(entities)}]>{domain_xml(body)}"


def test_billion_laughs_is_rejected_unexpanded() -> None:
    started = time.monotonic()

    policy = resolve("web1", billion_laughs(), Settings())

    assert policy.state == "invalid"
    assert "DTD" in policy.reason
    assert "lol" not in policy.reason
    # Expanding 10**9 entities would take minutes and gigabytes; this is a
    # guard against that, not a speed requirement.
    assert time.monotonic() - started < 10


def test_external_entity_is_not_read(tmp_path: Path) -> None:
    # If the entity were resolved, min_unused would be a valid 300 MiB and
    # the domain managed with it.
    secret = tmp_path / "secret.txt"
    secret.write_text("300 MiB")
    body = policy_element("<b:min_unused>&x;</b:min_unused>")
    hostile = f"<!DOCTYPE domain [<!ENTITY x SYSTEM '{secret.as_uri()}'>]>" + (
        domain_xml(body)
    )

    policy = resolve("web1", hostile, Settings())

    assert policy.state == "invalid"
    assert policy.params is None
    assert "300" not in policy.reason


def test_parameter_entity_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "evil.dtd"
    secret.write_text("<!ENTITY x '300 MiB'>")
    hostile = (
        f"<!DOCTYPE domain [<!ENTITY % p SYSTEM '{secret.as_uri()}'> %p;]>"
        + domain_xml(policy_element("<b:min_unused>&x;</b:min_unused>"))
    )

    policy = resolve("web1", hostile, Settings())

    assert policy.state == "invalid"
    assert policy.params is None


def test_dtd_in_persistent_xml_is_rejected() -> None:
    persistent = "<!DOCTYPE domain []>" + domain_xml(policy_element(managed="no"))

    policy = resolve("web1", domain_xml(), Settings(), persistent)

    assert policy.state == "invalid"
    assert "DTD" in policy.reason


def test_undefined_entity_is_invalid() -> None:
    # libvirt drops a DTD from a defined domain but keeps its entity
    # references, so its XML has entities that no DTD defines.
    xml = domain_xml(policy_element("<b:min_unused>&x;</b:min_unused>"))

    policy = resolve("web1", xml, Settings())

    assert policy.state == "invalid"
    assert "undefined entity" in policy.reason


def test_duplicate_field_is_invalid() -> None:
    body = "<b:min_unused>300 MiB</b:min_unused><b:min_unused>1 KiB</b:min_unused>"

    policy = resolve("web1", domain_xml(policy_element(body)), Settings())

    assert policy.state == "invalid"
    assert policy.field == "min_unused"
    assert "more than once" in policy.reason


def test_nested_field_is_invalid() -> None:
    body = "<b:min_unused><b:x>1</b:x>300 MiB</b:min_unused>"

    policy = resolve("web1", domain_xml(policy_element(body)), Settings())

    assert policy.state == "invalid"
    assert policy.field == "min_unused"
    assert "child elements" in policy.reason


def test_policy_in_wrong_namespace_is_ignored() -> None:
    # Another tool's <policy> element, or a typo in the namespace URI, is
    # not balloonctl's: the domain gets the global settings.
    wrong = policy_element("<b:min_unused>1 KiB</b:min_unused>").replace(
        NAMESPACE, NAMESPACE + "x"
    )
    unqualified = "<policy><min_unused>1 KiB</min_unused></policy>"

    for metadata in (wrong, unqualified):
        policy = resolve("web1", domain_xml(metadata), Settings())

        assert policy.state == "managed"
        assert policy.params is not None
        assert policy.params.min_unused == 100 * MIB


def test_oversized_metadata_is_invalid() -> None:
    body = policy_element(f"<b:min_unused>{'1' * MAX_XML_BYTES} KiB</b:min_unused>")

    policy = resolve("web1", domain_xml(body), Settings())

    assert policy.state == "invalid"
    assert "too large" in policy.reason


def test_deep_nesting_is_handled() -> None:
    deep = "<x>" * 100_000 + "</x>" * 100_000

    policy = resolve("web1", domain_xml(deep), Settings())

    assert policy.state == "managed"


FIELDS = ["min_unused", "max_release", "min_release", "metric", "floor_percent"]
field_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["100 MiB", "0 KiB", "-5 MiB", "1e9 GiB", "99999999999999999999 TiB"]
    ),
    st.sampled_from(["&a;", "&#0;", "&#x110000;", "]]>", "<![CDATA[x]]>", "<!--"]),
)
policy_bodies = st.lists(
    st.tuples(st.sampled_from([*FIELDS, "colour", "managed"]), field_text), max_size=4
).map(lambda rows: "".join(f"<b:{key}>{text}</b:{key}>" for key, text in rows))
managed_values = st.none() | st.sampled_from(["yes", "no", "", "YES", "1"])


@settings(max_examples=400, deadline=None)
@given(body=policy_bodies, managed=managed_values)
def test_any_metadata_gives_a_policy(body: str, managed: str | None) -> None:
    policy = resolve("web1", domain_xml(policy_element(body, managed)), Settings())

    assert policy.state in ("managed", "excluded", "invalid")
    if policy.state == "managed":
        assert policy.params is not None
        assert policy.params.min_unused > 0
        assert policy.params.max_release > 0
        assert policy.params.min_release <= policy.params.max_release
    if policy.state == "invalid":
        assert policy.reason


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("<>/!&;'\"=[] ?x" + string.ascii_letters))
    )
)
def test_any_text_gives_a_policy(text: str) -> None:
    policy = resolve("web1", text, Settings())

    assert policy.state in ("managed", "excluded", "invalid")
