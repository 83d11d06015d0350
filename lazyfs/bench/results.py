"""The results directory of an experiment: append-only run records, CSV, JSON, configuration.

```
RESULTS/
  experiment.toml     the experiment file as given
  config.json         experiment (parsed), fingerprint, prepared images, one environment
                      record (software versions, machine) per `run` invocation
  runs.jsonl          one JSON object per finished run, appended with one write + fsync
  results.json        {"config": ..., "runs": [...]}   rewritten (tmp + rename) after each run
  runs.csv            the scalar fields of every run      rewritten likewise
  events/RUN_ID.json  the lazyfs daemon's fetch events of that run (fetch timeline)
```

``runs.jsonl`` is the truth; a torn last line (a crash during the write) is ignored, and the
run it described is repeated by ``--resume``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .errors import BenchError

# Scalar fields, in CSV column order. Every record has every one (None when not applicable).
FIELDS = (
    "run_id", "experiment", "image", "workload", "mode", "serve", "policies", "profile", "rate_mbit", "rtt_ms",
    "repetition", "status", "error", "started_at",
    "pull_s", "start_to_ready_s", "ready_s", "total_s", "exit_code", "killed_after_ready",
    "registry_requests", "registry_bytes", "registry_blob_requests", "registry_blob_bytes", "link_utilisation",
    "image_layer_bytes", "workload_read_bytes", "workload_read_requests",
    "lazyfs_fetch_requests", "lazyfs_fetched_bytes", "lazyfs_chunks_fetched", "lazyfs_cache_hits",
    "daemon_cpu_s", "containerd_cpu_s", "daemon_pid", "cache_files_at_start",
    "page_cache_before_kib", "page_cache_after_kib", "fetch_events",
)
OK = "ok"
FAILED = "failed"
UNAVAILABLE = "unavailable"


class ResultsError(BenchError):
    """The results directory is unusable (belongs to another experiment, unreadable)."""


def _write_atomically(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.events_dir = self.dir / "events"
        self.runs_path = self.dir / "runs.jsonl"
        self.config_path = self.dir / "config.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def create(self, experiment_toml: str, config: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events_dir.mkdir(exist_ok=True)
        _write_atomically(self.dir / "experiment.toml", experiment_toml)
        _write_atomically(self.config_path, json.dumps(config, indent=1))

    def config(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, ValueError) as e:
            raise ResultsError(f"{self.config_path}: {e}") from None

    def update_config(self, config: dict) -> None:
        _write_atomically(self.config_path, json.dumps(config, indent=1))

    def runs(self) -> list[dict]:
        """Finished runs; the last record of a run id wins (a failed run repeated by resume)."""
        if not self.runs_path.exists():
            return []
        by_id: dict[str, dict] = {}
        for line in self.runs_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line from a crash mid-write
            if isinstance(record, dict) and "run_id" in record:
                by_id[record["run_id"]] = record
        return list(by_id.values())

    def append(self, record: dict, events: list[dict] | None = None) -> None:
        if events is not None:
            _write_atomically(self.events_dir / f"{record['run_id']}.json", json.dumps(events))
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.runs_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a torn last line must not swallow this record: start on a new line
                with open(self.runs_path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.write_tables()

    def write_tables(self) -> None:
        runs = self.runs()
        _write_atomically(self.dir / "results.json",
                          json.dumps({"config": self.config(), "runs": runs}, indent=1))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in runs:
            writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in FIELDS})
        _write_atomically(self.dir / "runs.csv", out.getvalue())

    def events(self, run_id: str) -> list[dict]:
        try:
            return json.loads((self.events_dir / f"{run_id}.json").read_text())
        except (OSError, ValueError):
            return []


def load_results(directory: Path) -> tuple[dict, list[dict], ResultStore]:
    store = ResultStore(directory)
    if not store.exists():
        raise ResultsError(f"{directory}: not a results directory (no config.json)")
    return store.config(), store.runs(), store
