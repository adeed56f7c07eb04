"""What every stage shares: typed ``key=value`` settings and the start-up of every command (``settings``),
user-facing errors (``errors``), rank-0 logging (``logs``), atomic writes and the cache (``paths``), JSON/JSONL
reading with one-line errors (``jsonfiles``) and the resumable journal of long jobs (``journal``)."""
