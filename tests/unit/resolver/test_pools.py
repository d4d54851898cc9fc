"""Pool settings: public IP pools, VLAN ranges and each VLAN's internal subnet."""

from __future__ import annotations

import ipaddress

import pytest

from services.resolver.pools import Pools, gateway, internal_hosts, parse_ip_pool, parse_vlan_range
from shared.errors import ConfigurationError
from shared.settings import Settings


def test_ip_pool_takes_usable_hosts_of_cidrs_single_addresses_and_ranges_in_order() -> None:
    # Given a pool written with every form it accepts
    pool = parse_ip_pool("198.51.100.0/30, 203.0.113.9, 203.0.113.20-203.0.113.22")
    # Then a CIDR gives its usable hosts, a range every address in it, duplicates once
    assert pool == ("198.51.100.1", "198.51.100.2", "203.0.113.9", "203.0.113.20",
                    "203.0.113.21", "203.0.113.22")
    assert parse_ip_pool("203.0.113.7/32, 203.0.113.7") == ("203.0.113.7",)


@pytest.mark.parametrize("text, says", [
    ("198.51.100.1/24", "has host bits set"),
    ("203.0.113.9-203.0.113.1", "is after"),
    ("banana", "does not appear to be an IPv4 or IPv6"),
    (" , ", "lists no address"),
    ("10.0.0.0/8", "too large"),
])
def test_unusable_ip_pool_is_a_configuration_error_naming_the_part(text: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match="FERRY_PUBLIC_IP_POOL") as caught:
        parse_ip_pool(text)
    assert says in str(caught.value)


def test_vlan_range_accepts_ids_and_ranges_and_refuses_ids_outside_1_to_4094() -> None:
    assert parse_vlan_range("100-102, 7, 101") == (7, 100, 101, 102)
    for bad in ("0-10", "4000-4095", "a-b", "10-5", ""):
        with pytest.raises(ConfigurationError, match="FERRY_VLAN_RANGE"):
            parse_vlan_range(bad)


def test_vlan_n_gets_the_nth_subnet_of_the_internal_network() -> None:
    # Given the defaults: 10.128.0.0/12 carved in /24s
    pools = Pools.from_settings(Settings())
    # Then VLAN 100 is 10.128.100.0/24 and VLAN 300 the 300th /24, whatever the range says
    assert str(pools.subnet(100)) == "10.128.100.0/24"
    assert str(pools.subnet(300)) == "10.129.44.0/24"
    assert pools.vm_prefix == "tm21-s" and pools.env_prefix == "tm21-e"
    assert (pools.vm_first_number, pools.env_first_number) == (101, 50)
    subnet = ipaddress.IPv4Network("10.128.100.0/24")
    assert gateway(subnet) == "10.128.100.1"
    hosts = internal_hosts(subnet)
    assert hosts[0] == "10.128.100.2" and hosts[-1] == "10.128.100.254" and len(hosts) == 253


def test_internal_network_too_small_for_the_vlan_range_is_refused() -> None:
    settings = Settings(internal_network="10.128.0.0/16", vlan_range="100-400")
    with pytest.raises(ConfigurationError, match="too few for VLAN 400"):
        Pools.from_settings(settings)
    with pytest.raises(ConfigurationError, match="IPv4"):
        Pools.from_settings(Settings(internal_network="fd00::/48"))
