"""One-shot: which MLflow this image holds and which database schemas it can upgrade from.

    python -m tracking.schema_info
    {"mlflow": "3.17.2", "tracking_schema": {"head": ..., "known": [...]}, "auth_schema": {...}}

backup.py records the version in the manifest; restore.py refuses an archive
whose schema revision is not among `known`: a newer MLflow wrote it, and this one could
neither read nor upgrade it.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING

# Importing MLflow's server package warns about a module it uses; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")

import mlflow  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402

# The same migration configurations the tracking server upgrades its databases with.
from mlflow.server.auth.db.utils import _get_alembic_config as auth_alembic_config  # noqa: E402
from mlflow.store.db.utils import _get_alembic_config as tracking_alembic_config  # noqa: E402

if TYPE_CHECKING:
    from alembic.config import Config


def revisions(config: Config) -> dict:
    script = ScriptDirectory.from_config(config)
    return {"head": script.get_current_head(), "known": sorted(r.revision for r in script.walk_revisions())}


def main() -> None:
    print(json.dumps({
        "mlflow": mlflow.__version__,
        # No database is opened: the URL only fills the configuration.
        "tracking_schema": revisions(tracking_alembic_config("postgresql://")),
        "auth_schema": revisions(auth_alembic_config("postgresql://")),
    }))


if __name__ == "__main__":
    main()
