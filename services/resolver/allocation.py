"""Allocating a migration's new entities inside the caller's transaction.

Everything happens on the caller's connection, so it commits or rolls back with the inbox
claim and the outbox events. Order matters for locks and their length:
1. the customer's row (FOR UPDATE): one customer's migrations take turns, so they agree on
   its VLAN; different customers never wait for each other here;
2. pool rows (public IPs, the VLAN, internal IPs): `UPDATE … WHERE key = (SELECT … FOR
   UPDATE SKIP LOCKED LIMIT 1) RETURNING`, so concurrent migrations take different rows
   without waiting;
3. the name counters (FOR UPDATE) last, so the one lock every migration shares is held
   only for the little that is left before commit.
A migration that already holds allocations (a replayed message) gets the same ones back.
SQLite has no row locks: its writers take turns (BEGIN IMMEDIATE), so the same statements
are safe there.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Connection, Table, func, insert, select, update

from services.resolver.pools import Pools, gateway, insert_ignoring_duplicates, seed_internal_ips
from services.resolver.tables import (
    customers,
    internal_ips,
    name_sequences,
    names,
    public_ips,
    vlans,
)
from shared.errors import PermanentError, TransientError

LAST_NUMBER = 99999  # names have five digits
BUSY_ROUNDS = 50  # free rows all locked by others: look again this many times, then retry later


class PoolExhaustedError(PermanentError):
    """A pool has fewer free entries than a migration needs; nothing was allocated."""

    def __init__(self, pool: str, needed: int, free: int) -> None:
        self.pool, self.needed, self.free = pool, needed, free
        super().__init__(f"{pool} exhausted: {needed} needed, {free} free")


@dataclass(frozen=True)
class Needs:
    """What one migration asks for: duids in document order."""

    customer_id: str
    environments: tuple[str, ...]
    vms: tuple[str, ...]
    public_ips: tuple[str, ...]


@dataclass(frozen=True)
class Vlan:
    id: int
    subnet: str
    gateway: str


@dataclass
class Allocations:
    vlan: Vlan
    environments: dict[str, str] = field(default_factory=dict)  # duid -> name
    vm_names: dict[str, str] = field(default_factory=dict)  # duid -> name
    internal_ips: dict[str, str] = field(default_factory=dict)  # vm duid -> address
    public_ips: dict[str, str] = field(default_factory=dict)  # duid -> address

    def as_payload(self) -> dict[str, Any]:
        """The `allocations` of migration.resolved."""
        return {
            "vms": {duid: {"name": name, "internal_ip": self.internal_ips[duid]}
                    for duid, name in self.vm_names.items()},
            "environments": dict(self.environments),
            "public_ips": dict(self.public_ips),
            "vlan": {"id": self.vlan.id, "subnet": self.vlan.subnet,
                     "gateway": self.vlan.gateway},
        }


class Allocator:
    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    def allocate(self, connection: Connection, migration_id: str, needs: Needs) -> Allocations:
        """Everything `needs` asks for, on `connection`'s open transaction.

        Raises PoolExhaustedError (the caller rolls back: nothing is kept), TransientError
        when every free row is held by transactions still running.
        """
        now = time.time()
        self._lock_customer(connection, needs.customer_id, now)
        vlan = self._vlan(connection, migration_id, needs.customer_id, now)
        result = Allocations(vlan=vlan)

        taken = _existing(connection, public_ips, migration_id, public_ips.c.address)
        missing = [d for d in needs.public_ips if d not in taken]
        for duid in missing:
            taken[duid] = self._claim(
                connection, public_ips, public_ips.c.address, [], public_ips.c.position,
                {"migration_id": migration_id, "duid": duid,
                 "customer_id": needs.customer_id, "allocated_at": now},
                f"public IP pool {self.pools.public_label}", len(missing))
        result.public_ips = {d: taken[d] for d in needs.public_ips}

        taken = _existing(connection, internal_ips, migration_id, internal_ips.c.address)
        missing = [d for d in needs.vms if d not in taken]
        for duid in missing:
            taken[duid] = self._claim(
                connection, internal_ips, internal_ips.c.address,
                [internal_ips.c.vlan_id == vlan.id], internal_ips.c.position,
                {"migration_id": migration_id, "duid": duid, "allocated_at": now},
                f"internal subnet {vlan.subnet} of VLAN {vlan.id}", len(missing))
        result.internal_ips = {d: taken[d] for d in needs.vms}

        held = _existing(connection, names, migration_id, names.c.name)
        wanted = [("environment", self.pools.env_prefix, d) for d in needs.environments
                  if d not in held]
        wanted += [("vm", self.pools.vm_prefix, d) for d in needs.vms if d not in held]
        if wanted:
            held.update(self._name(connection, migration_id, needs.customer_id, wanted, now))
        result.environments = {d: held[d] for d in needs.environments}
        result.vm_names = {d: held[d] for d in needs.vms}
        return result

    def _lock_customer(self, connection: Connection, customer_id: str, now: float) -> None:
        insert_ignoring_duplicates(connection, customers, [{"id": customer_id,
                                                            "created_at": now}])
        connection.execute(select(customers.c.id).where(customers.c.id == customer_id)
                           .with_for_update()).one()

    def _vlan(self, connection: Connection, migration_id: str, customer_id: str,
              now: float) -> Vlan:
        row = connection.execute(select(vlans.c.id, vlans.c.subnet)
                                 .where(vlans.c.customer_id == customer_id)).first()
        if row is not None:
            vlan_id, subnet_text = int(row.id), str(row.subnet)
        else:
            vlan_id = int(self._claim(
                connection, vlans, vlans.c.id, [], vlans.c.id,
                {"customer_id": customer_id, "migration_id": migration_id,
                 "allocated_at": now},
                f"VLAN range {self.pools.vlan_label}", 1, free_column=vlans.c.customer_id))
            subnet_text = str(connection.execute(
                select(vlans.c.subnet).where(vlans.c.id == vlan_id)).scalar_one())
            seed_internal_ips(connection, vlan_id, ipaddress.IPv4Network(subnet_text))
        subnet = ipaddress.IPv4Network(subnet_text)
        return Vlan(vlan_id, str(subnet), gateway(subnet))

    def _claim(self, connection: Connection, table: Table, key: Column[Any],
               where: list[Any], order: Column[Any], values: dict[str, Any], pool: str,
               needed: int, free_column: Column[Any] | None = None) -> Any:
        free = (free_column if free_column is not None else table.c.migration_id).is_(None)
        pick = (select(key).where(free, *where).order_by(order).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())
        claim = update(table).where(key == pick).values(**values).returning(key)
        for _ in range(BUSY_ROUNDS):
            got = connection.execute(claim).scalar_one_or_none()
            if got is not None:
                return got
            # Nothing claimable: truly empty, or every free row is locked by a transaction
            # still running (it may roll back), or PostgreSQL re-checked a row another
            # transaction just took and LIMIT 1 came back empty. Only the first is final.
            left = connection.execute(
                select(func.count()).select_from(table).where(free, *where)).scalar_one()
            if left == 0:
                mine = connection.execute(
                    select(func.count()).select_from(table)
                    .where(table.c.migration_id == values["migration_id"], *where)
                ).scalar_one()
                raise PoolExhaustedError(pool, needed, int(mine))
            time.sleep(0.02)
        raise TransientError(f"{pool}: every free entry is held by other migrations in flight")

    def _name(self, connection: Connection, migration_id: str, customer_id: str,
              wanted: list[tuple[str, str, str]], now: float) -> dict[str, str]:
        prefixes = sorted({prefix for _, prefix, _ in wanted})
        counters = {prefix: int(number) for prefix, number in connection.execute(
            select(name_sequences.c.prefix, name_sequences.c.next_number)
            .where(name_sequences.c.prefix.in_(prefixes))
            .order_by(name_sequences.c.prefix).with_for_update())}
        given: dict[str, str] = {}
        rows = []
        for prefix in prefixes:
            duids = [(kind, duid) for kind, p, duid in wanted if p == prefix]
            first = counters[prefix]
            if first + len(duids) - 1 > LAST_NUMBER:
                raise PoolExhaustedError(f"name sequence {prefix}NNNNN", len(duids),
                                         max(0, LAST_NUMBER - first + 1))
            for number, (kind, duid) in enumerate(duids, start=first):
                name = f"{prefix}{number:05d}"
                given[duid] = name
                rows.append({"name": name, "kind": kind, "prefix": prefix, "number": number,
                             "migration_id": migration_id, "duid": duid,
                             "customer_id": customer_id, "allocated_at": now})
            connection.execute(update(name_sequences).where(name_sequences.c.prefix == prefix)
                               .values(next_number=first + len(duids)))
        connection.execute(insert(names), rows)
        return given


def _existing(connection: Connection, table: Table, migration_id: str,
              value: Column[Any]) -> dict[str, Any]:
    rows = connection.execute(select(table.c.duid, value)
                              .where(table.c.migration_id == migration_id))
    return {str(duid): got for duid, got in rows}
