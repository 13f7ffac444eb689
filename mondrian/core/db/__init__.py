"""THE SQLite package: how mondrian opens a database, and every table and view it creates.
Callers import from `mondrian.core.db`; the modules below only cut it by table family.

- `connection`: `connect` / `open_db`, one set of settings for every connection (WAL and a
  busy timeout on writable ones, `mode=ro` for readers, DBError naming the file when it
  cannot be used), and adding the columns a newer mondrian has to an older file.
- `jobs`: the advisor's production records. An existing database whose column names differ
  is read through a mapping (canonical name -> actual column), so linking never depends on
  one naming scheme. Also the link cache's `images` and `verdicts` (mondrian.link.linker).
- `runs`: `runs`, `run_metrics`, training / evaluation runs (mondrian.train.runs).
- `service`: `requests`, `routing_configs`, `feedback` and the ab_* views: the served
  requests and what users said about them (mondrian.serve), read by the A/B report, by
  `mondrian harvest` and by analysts.
"""

from mondrian.core.db.connection import (
    DBError,
    add_missing_columns,
    as_connection,
    connect,
    connect_union,
    has_table,
    open_db,
)
from mondrian.core.db.jobs import (
    JOB_COLUMNS,
    REQUIRED_COLUMNS,
    JobColumns,
    count_jobs,
    create_jobs_table,
    create_link_cache_tables,
    read_jobs,
)
from mondrian.core.db.runs import create_runs_tables
from mondrian.core.db.service import (
    PAYLOAD_MODES,
    PINNED_ARM,
    REQUEST_COLUMNS,
    REQUEST_ERROR_SQL,
    REQUEST_VIEWS,
    VERDICTS,
    create_request_tables,
)

__all__ = [
    "JOB_COLUMNS", "PAYLOAD_MODES", "PINNED_ARM", "REQUEST_COLUMNS", "REQUEST_ERROR_SQL", "REQUEST_VIEWS",
    "REQUIRED_COLUMNS", "VERDICTS", "DBError", "JobColumns", "add_missing_columns", "as_connection", "connect", "connect_union",
    "count_jobs", "create_jobs_table", "create_link_cache_tables", "create_request_tables", "create_runs_tables",
    "has_table", "open_db", "read_jobs",
]
