"""The new site's pools, from settings: name sequences, public IPs, VLANs and their subnets.

Pools are seeded as rows on start (idempotent: several resolver processes may start at
once). Free rows that the settings no longer list are removed; taken rows stay, as the
record of who took them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, select, text, update
from sqlalchemy.dialects import sqlite

from services.resolver.tables import internal_ips, name_sequences, public_ips, vlans
from shared.db import dialect_insert
from shared.errors import ConfigurationError
from shared.settings import Settings

MAX_PUBLIC_ADDRESSES = 1 << 20  # a pool is seeded as rows: refuse what would not fit
CHUNK = 5000  # rows per statement: under SQLite's 32766 bound parameters

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Pools:
    site: str
    vm_first_number: int
    env_first_number: int
    public_label: str  # the pool as configured, for messages
    public_addresses: tuple[str, ...]
    vlan_label: str
    vlan_ids: tuple[int, ...]
    internal_network: ipaddress.IPv4Network
    subnet_prefix: int

    @property
    def vm_prefix(self) -> str:
        return f"{self.site}-s"

    @property
    def env_prefix(self) -> str:
        return f"{self.site}-e"

    def subnet(self, vlan_id: int) -> ipaddress.IPv4Network:
        """VLAN n's subnet: the n-th subnet of the internal network (stable if ranges change)."""
        size = 1 << (32 - self.subnet_prefix)
        base = int(self.internal_network.network_address) + vlan_id * size
        return ipaddress.IPv4Network((base, self.subnet_prefix))

    @classmethod
    def from_settings(cls, settings: Settings) -> Pools:
        """Raises ConfigurationError naming the setting that cannot be used."""
        try:
            network = ipaddress.ip_network(settings.internal_network.strip())
        except ValueError as error:
            raise ConfigurationError(f"FERRY_INTERNAL_NETWORK: {error}") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise ConfigurationError("FERRY_INTERNAL_NETWORK must be an IPv4 network")
        if settings.internal_subnet_prefix < network.prefixlen:
            raise ConfigurationError(
                f"FERRY_INTERNAL_SUBNET_PREFIX /{settings.internal_subnet_prefix} is larger "
                f"than FERRY_INTERNAL_NETWORK {network}")
        ids = parse_vlan_range(settings.vlan_range)
        subnets = 1 << (settings.internal_subnet_prefix - network.prefixlen)
        if max(ids) >= subnets:
            raise ConfigurationError(
                f"FERRY_INTERNAL_NETWORK {network} has {subnets} /"
                f"{settings.internal_subnet_prefix} subnets, too few for VLAN {max(ids)} "
                "(VLAN n gets subnet n)")
        return cls(
            site=settings.site,
            vm_first_number=settings.vm_first_number,
            env_first_number=settings.env_first_number,
            public_label=_label(settings.public_ip_pool),
            public_addresses=parse_ip_pool(settings.public_ip_pool),
            vlan_label=_label(settings.vlan_range),
            vlan_ids=ids,
            internal_network=network,
            subnet_prefix=settings.internal_subnet_prefix,
        )


def _label(text: str) -> str:
    return ",".join(part.strip() for part in text.split(",") if part.strip())


def parse_ip_pool(text: str) -> tuple[str, ...]:
    """Addresses of `a.b.c.d/n` (its usable hosts), `a.b.c.d` and `a-b` parts, in order.

    Raises ConfigurationError for a part that is none of these, or a pool too large.
    """
    addresses: dict[str, None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                first_text, last_text = (x.strip() for x in part.split("-", 1))
                first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
                if first.version != last.version or int(first) > int(last):
                    raise ValueError(f"{first} is after {last} or of another IP version")
                count = int(last) - int(first) + 1
                _check_size(part, len(addresses) + count)
                addresses.update(dict.fromkeys(str(first + i) for i in range(count)))
            else:
                network = ipaddress.ip_network(part, strict=True)
                _check_size(part, len(addresses) + network.num_addresses)
                addresses.update(dict.fromkeys(str(host) for host in network.hosts()))
        except ValueError as error:
            raise ConfigurationError(f"FERRY_PUBLIC_IP_POOL part {part!r}: {error}") from None
    if not addresses:
        raise ConfigurationError("FERRY_PUBLIC_IP_POOL lists no address")
    return tuple(addresses)


def _check_size(part: str, count: int) -> None:
    if count > MAX_PUBLIC_ADDRESSES:
        raise ConfigurationError(f"FERRY_PUBLIC_IP_POOL is too large at {part!r}: "
                                 f"more than {MAX_PUBLIC_ADDRESSES} addresses")


def parse_vlan_range(text: str) -> tuple[int, ...]:
    """VLAN ids of `n` and `a-b` parts, sorted. Raises ConfigurationError outside 1-4094."""
    ids: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            first, _, last = part.partition("-")
            low, high = int(first), int(last or first)
        except ValueError:
            raise ConfigurationError(f"FERRY_VLAN_RANGE part {part!r} is not n or a-b") from None
        if not 1 <= low <= high <= 4094:
            raise ConfigurationError(f"FERRY_VLAN_RANGE part {part!r}: VLAN ids are 1-4094")
        ids.update(range(low, high + 1))
    if not ids:
        raise ConfigurationError("FERRY_VLAN_RANGE lists no VLAN")
    return tuple(sorted(ids))


def gateway(subnet: ipaddress.IPv4Network) -> str:
    """The subnet's first host, kept for the VLAN's router."""
    return str(next(subnet.hosts()))


def internal_hosts(subnet: ipaddress.IPv4Network) -> list[str]:
    """The addresses VMs may get: every host but the gateway."""
    return [str(host) for host in subnet.hosts()][1:]


def seed_internal_ips(connection: Connection, vlan_id: int,
                      subnet: ipaddress.IPv4Network) -> None:
    """The rows of a VLAN's internal addresses, when a customer first takes the VLAN."""
    if connection.dialect.name == "postgresql":
        # Generated by the server: one short statement instead of a few hundred rows of SQL.
        connection.execute(text(
            "INSERT INTO internal_ips (address, vlan_id, position) "
            "SELECT host(CAST(:network AS inet) + n), :vlan, n - 2 "
            "FROM generate_series(2, :last) AS n ON CONFLICT DO NOTHING"),
            {"network": str(subnet.network_address), "vlan": vlan_id,
             "last": subnet.num_addresses - 2})
        return
    rows = [{"address": address, "vlan_id": vlan_id, "position": position}
            for position, address in enumerate(internal_hosts(subnet))]
    connection.execute(sqlite.insert(internal_ips).on_conflict_do_nothing(), rows)


def insert_ignoring_duplicates(connection: Connection, table: Table,
                               rows: Sequence[dict[str, Any]]) -> None:
    """INSERT … ON CONFLICT DO NOTHING (safe when several processes seed at once), as
    multi-row statements: one round trip per chunk instead of one per row."""
    for start in range(0, len(rows), CHUNK):
        stmt = dialect_insert(connection, table).values(list(rows[start:start + CHUNK]))
        connection.execute(stmt.on_conflict_do_nothing())


def _delete_free(connection: Connection, table: Table, key: Any, free: Any,
                 stale: Iterable[Any]) -> None:
    stale = list(stale)
    for start in range(0, len(stale), CHUNK):
        connection.execute(delete(table).where(key.in_(stale[start:start + CHUNK]), free))


def seed_pools(engine: Engine, pools: Pools) -> None:
    """Make the pool rows match the settings: add what is missing, drop free rows no longer
    configured, start name counters at the first numbers (a counter never goes back)."""
    with engine.begin() as connection:
        for prefix, first in ((pools.vm_prefix, pools.vm_first_number),
                              (pools.env_prefix, pools.env_first_number)):
            insert_ignoring_duplicates(connection, name_sequences,
                                       [{"prefix": prefix, "next_number": first}])
            connection.execute(
                update(name_sequences)
                .where(name_sequences.c.prefix == prefix, name_sequences.c.next_number < first)
                .values(next_number=first))

        have = set(connection.execute(select(public_ips.c.address)).scalars())
        wanted = {address: position for position, address in enumerate(pools.public_addresses)}
        insert_ignoring_duplicates(connection, public_ips, [
            {"address": address, "position": position}
            for address, position in wanted.items() if address not in have])
        _delete_free(connection, public_ips, public_ips.c.address,
                     public_ips.c.migration_id.is_(None), have - wanted.keys())

        have_vlans = set(connection.execute(select(vlans.c.id)).scalars())
        insert_ignoring_duplicates(connection, vlans, [
            {"id": vlan_id, "subnet": str(pools.subnet(vlan_id))}
            for vlan_id in pools.vlan_ids if vlan_id not in have_vlans])
        _delete_free(connection, vlans, vlans.c.id, vlans.c.customer_id.is_(None),
                     have_vlans - set(pools.vlan_ids))
