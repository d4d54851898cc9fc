"""The archiver service. `SCHEMA` names its database and where its Alembic scripts are."""

from pathlib import Path

from shared.db import Schema

SCHEMA = Schema("archiver", Path(__file__).with_name("migrations"))
