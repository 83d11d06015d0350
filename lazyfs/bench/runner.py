"""Run an experiment's matrix: prepare images, then for each profile bring up its registry and
measure every (image, workload, repetition, mode) run, recording each as it finishes.

Order: profiles outermost (one registry each), then images, workloads, repetitions, and the
modes innermost, so modes alternate and a slow drift of the machine affects them alike.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .env import BenchEnv
from .errors import BenchError
from .experiment import Experiment, Profile, RunKey, policies_label
from .images import default_cache_dir
from .measure import Workload
from .modes import Mode, ModeUnavailable, PrepareContext, RunTarget, make_mode
from .netshape import LinkShape, ShapedRegistry
from .prepare import LAZY, SourceImage, convert_cached, push, registry_names, resolve_image
from .registrylog import log_position, traffic_since
from .results import FAILED, FIELDS, OK, UNAVAILABLE, ResultsError, ResultStore
from .sysinfo import environment
from .system import DaemonSettings, PlainRegistry, make_work_dir

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """What the runner tells a progress display."""

    def phase(self, text: str) -> None: ...

    def begin(self, total: int, done: int) -> None: ...

    def run_started(self, key: RunKey) -> None: ...

    def run_finished(self, key: RunKey, record: dict) -> None: ...


class SilentReporter:
    def phase(self, text: str) -> None:
        log.info("%s", text)

    def begin(self, total: int, done: int) -> None:
        pass

    def run_started(self, key: RunKey) -> None:
        pass

    def run_finished(self, key: RunKey, record: dict) -> None:
        pass


class ExperimentRefused(BenchError):
    """The experiment cannot start as asked (unavailable modes, results of another experiment)."""


@contextlib.contextmanager
def registry_for(profile: Profile, storage: Path, log_dir: Path) -> Iterator[PlainRegistry | ShapedRegistry]:
    if not profile.shaped:
        with PlainRegistry(storage, log_dir / f"registry-{profile.name}") as registry:
            yield registry
        return
    shape = LinkShape(profile.rate_mbit, profile.rtt_ms or 0.0)
    with ShapedRegistry(storage, shape, registry_log=log_dir / f"registry-{profile.name}.log") as registry:
        yield registry


def resolve_workload(experiment: Experiment, workload_name: str, source: SourceImage) -> Workload:
    spec = next(w for w in experiment.workloads if w.name == workload_name)
    if spec.command is not None:
        assert spec.ready is not None
        return Workload(spec.name, spec.command, spec.ready)
    assert source.workload is not None and source.ready_line is not None
    ready = spec.ready or f"^{re.escape(source.ready_line)}$"
    return Workload(spec.name, source.workload, ready)


class Runner:
    def __init__(self, experiment: Experiment, results_dir: Path, *, resume: bool = False,
                 skip_unavailable: bool = False, reporter: Reporter | None = None,
                 cache_dir: Path | None = None):
        self.experiment = experiment
        self.store = ResultStore(results_dir)
        self.resume = resume
        self.skip_unavailable = skip_unavailable
        self.reporter = reporter or SilentReporter()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.modes: dict[str, Mode] = {name: make_mode(name) for name in experiment.modes}
        self.sources: dict[str, SourceImage] = {}

    @property
    def registry_storage(self) -> Path:
        return Path(self.experiment.registry_root or self.cache_dir / "registry")

    # ------------------------------------------------------------------ entry point

    def run(self) -> list[dict]:
        """Run every run not yet finished; return all records of the results directory."""
        unavailable = {n: m.unavailable_reason() for n, m in self.modes.items() if m.unavailable_reason()}
        if unavailable and not self.skip_unavailable:
            raise ExperimentRefused("; ".join(unavailable.values()) +
                                    " (remove the mode, or pass --skip-unavailable to record "
                                    "its runs as unavailable)")
        self._open_results()
        # Runs recorded as unavailable are looked at again: the build may have gained the mode.
        finished = {r["run_id"] for r in self.store.runs() if r["status"] == OK}
        keys = self.experiment.runs()
        todo = [k for k in keys if k.run_id not in finished]
        self.reporter.begin(len(keys), len(keys) - len(todo))
        for key in [k for k in todo if k.mode in unavailable]:
            self._record(key, self._base_record(key, UNAVAILABLE, unavailable[key.mode]))
        todo = [k for k in todo if k.mode not in unavailable]
        if not todo:
            return self.store.runs()
        self._prepare_images({k.image for k in todo}, {self.modes[k.mode].variant for k in todo})
        work_dir = make_work_dir()
        env = BenchEnv(work_dir)
        try:
            self.reporter.phase("starting containerd")
            env.start()
            for profile in self.experiment.profiles:
                runs = [k for k in todo if k.profile == profile.name]
                if not runs:
                    continue
                self.reporter.phase(f"registry for profile {profile.name}")
                with registry_for(profile, self.registry_storage, work_dir) as registry:
                    env.use_registry(registry.endpoint, registry.registry_log)
                    for key in runs:
                        self._record(key, *self._run_one(env, key, profile))
        finally:
            self.reporter.phase("stopping containerd and lazyfs")
            env.stop()
            self._keep_logs(env)
            shutil.rmtree(work_dir, ignore_errors=True)
        return self.store.runs()

    def _keep_logs(self, env: BenchEnv) -> None:
        """containerd's, the snapshotter's and the daemon's logs go to RESULTS/logs (appended)."""
        logs = self.store.dir / "logs"
        logs.mkdir(exist_ok=True)
        for path in (env.containerd.log_path, env.snapshotter.log_path, env.daemon_log):
            if path.exists():
                with open(path, "rb") as src, open(logs / path.name, "ab") as dst:
                    shutil.copyfileobj(src, dst)

    def _open_results(self) -> None:
        fingerprint = self.experiment.fingerprint()
        if self.store.exists():
            config = self.store.config()
            if not self.resume:
                raise ExperimentRefused(f"{self.store.dir} already holds results; pass --resume to "
                                        "continue them, or choose another --results directory")
            if config.get("fingerprint") != fingerprint:
                raise ResultsError(f"{self.store.dir} holds results of a different experiment "
                                   f"(fingerprint {config.get('fingerprint')}, this one {fingerprint})")
            config.setdefault("environments", []).append(environment())
            self.store.update_config(config)
            return
        self.store.create(self.experiment.source, {
            "experiment": self.experiment.to_json(), "fingerprint": fingerprint,
            "registry_storage": str(self.registry_storage), "images": {},
            "environments": [environment()],
        })

    # ------------------------------------------------------------------ images

    def _prepare_images(self, names: set[str], variants: set[str]) -> None:
        config = self.store.config()
        with contextlib.ExitStack() as stack:
            registry = None
            for spec in self.experiment.images:
                if spec.name not in names:
                    continue
                self.reporter.phase(f"building/finding image {spec.name}")
                source = resolve_image(spec, self.cache_dir)
                if LAZY in variants:
                    self.reporter.phase(f"converting {spec.name} (cached)")
                    source.variants[LAZY] = convert_cached(source, self.experiment.chunk_size, self.cache_dir)
                if registry is None:
                    registry = stack.enter_context(PlainRegistry(
                        self.registry_storage, make_work_dir()))
                    stack.callback(shutil.rmtree, registry.run_dir, True)
                for variant, image in source.variants.items():
                    self.reporter.phase(f"pushing {spec.name} ({variant})")
                    push(image, registry.endpoint, *registry_names(source, variant, self.experiment.chunk_size))
                self.sources[spec.name] = source
                config["images"][spec.name] = _variants_json(source)
        self.store.update_config(config)

    def _record_variants(self, source: SourceImage) -> None:
        config = self.store.config()
        config["images"][source.name] = _variants_json(source)
        self.store.update_config(config)

    def _prepare_context(self) -> PrepareContext:
        return PrepareContext(self.cache_dir, self.experiment.chunk_size, self.experiment.timeout_s)

    # ------------------------------------------------------------------ one run

    def _base_record(self, key: RunKey, status: str, error: str | None) -> dict:
        profile = next(p for p in self.experiment.profiles if p.name == key.profile)
        record = {field: None for field in ("pull_s", "start_to_ready_s", "ready_s", "total_s")}
        record.update({
            "run_id": key.run_id, "experiment": self.experiment.name, "image": key.image,
            "workload": key.workload, "mode": key.mode, "profile": key.profile,
            "serve": key.serve,
            "policies": None if key.policies is None else policies_label(key.policies),
            "rate_mbit": profile.rate_mbit, "rtt_ms": profile.rtt_ms, "repetition": key.repetition,
            "status": status, "error": error,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return record

    def _run_one(self, env: BenchEnv, key: RunKey, profile: Profile) -> tuple[dict, list[dict] | None]:
        mode = self.modes[key.mode]
        source = self.sources[key.image]
        workload = resolve_workload(self.experiment, key.workload, source)
        record = self._base_record(key, FAILED, None)
        target: RunTarget | None = None
        try:
            known = set(source.variants)
            self.reporter.phase(f"preparing {key.image} for {key.mode}")
            image = mode.image_for(self._prepare_context(), env, source, workload)
            if set(source.variants) != known:
                self._record_variants(source)
            self.reporter.run_started(key)
            target = RunTarget(key.image, image, workload, f"bench-{secrets.token_hex(4)}",
                               self.experiment.timeout_s)
            with env.settings(DaemonSettings(key.serve, key.policies)):
                reset = mode.setup(env, target)
            assert env.registry_log is not None
            position = log_position(env.registry_log)
            daemon_cpu, containerd_cpu = env.daemon_cpu(), env.containerd_cpu()
            stats_before = env.snapshotter.daemon_request("stats")
            serving = env.snapshotter.daemon_request("ping").get("serve")
            timings = mode.run(env, target)
            stats = env.snapshotter.daemon_request("stats")
            layers = env.snapshotter.daemon_request("list").get("layers", [])
            fetch_log = env.snapshotter.daemon_request("fetch-log", timeout=30)
            daemon_cpu_after, containerd_cpu_after = env.daemon_cpu(), env.containerd_cpu()
            time.sleep(0.2)  # the registry writes its access-log line after the body
            traffic = traffic_since(env.registry_log, position)
        except (BenchError, ModeUnavailable, subprocess.SubprocessError, OSError) as e:
            log.info("run %s failed: %s", key.run_id, e)
            record["error"] = str(e)[-4000:]
            return self._complete(record), None
        finally:
            if target is not None:
                with contextlib.suppress(BenchError, subprocess.SubprocessError, OSError):
                    mode.teardown(env, target)
        events = [{**e, "start": e["start"] - timings.started_wall, "end": e["end"] - timings.started_wall}
                  for e in fetch_log.get("events", []) if e["end"] >= timings.started_wall]
        fetch = stats["fetch"]
        record.update(timings.to_json())
        if mode.snapshotter == "lazyfs":
            # The daemon's own word on its serving mode; the policies stay as configured
            # ("default" when none were: the daemon's default set).
            record["serve"] = serving
            record["policies"] = record["policies"] or policies_label(())
            record["layers_served"] = dict(Counter(layer.get("serve", "fuse") for layer in layers))
            record["daemon_policy_arg"] = daemon_policy_arg(reset.daemon_pid)
        record.update({
            "status": OK,
            "link_utilisation": link_utilisation(traffic.bytes, profile, timings.ready_s),
            "registry_requests": traffic.requests, "registry_bytes": traffic.bytes,
            "registry_blob_requests": traffic.blob_requests, "registry_blob_bytes": traffic.blob_bytes,
            "registry_by_status": traffic.by_status,
            "image_layer_bytes": target.image.layer_bytes,
            "workload_read_bytes": (stats["reads"]["bytes"] - stats_before["reads"]["bytes"]
                                    if mode.snapshotter == "lazyfs" else None),
            "workload_read_requests": (stats["reads"]["requests"] - stats_before["reads"]["requests"]
                                       if mode.snapshotter == "lazyfs" else None),
            "lazyfs_fetch_requests": fetch["requests"] - stats_before["fetch"]["requests"],
            "lazyfs_fetched_bytes": fetch["bytes_fetched"] - stats_before["fetch"]["bytes_fetched"],
            "lazyfs_chunks_fetched": fetch["chunks_fetched"] - stats_before["fetch"]["chunks_fetched"],
            "lazyfs_cache_hits": fetch["hits"] - stats_before["fetch"]["hits"],
            "daemon_cpu_s": _delta(daemon_cpu, daemon_cpu_after),
            "containerd_cpu_s": _delta(containerd_cpu, containerd_cpu_after),
            "daemon_pid": reset.daemon_pid, "cache_files_at_start": reset.cache_files,
            "page_cache_before_kib": reset.page_cache_before_kib,
            "page_cache_after_kib": reset.page_cache_after_kib,
            "fetch_events": len(events),
            "fetch_events_dropped": fetch_log.get("dropped", 0),
            "lazyfs_stats": stats,
            "output_tail": timings.output_tail[-2000:],
        })
        return self._complete(record), events

    @staticmethod
    def _complete(record: dict) -> dict:
        for field in FIELDS:
            record.setdefault(field, None)
        return record

    def _record(self, key: RunKey, record: dict, events: list[dict] | None = None) -> None:
        self.store.append(self._complete(record), events)
        self.reporter.run_finished(key, record)


def _variants_json(source: SourceImage) -> dict:
    return {variant: {"manifest_digest": i.manifest_digest, "layer_bytes": i.layer_bytes,
                      "layers": i.layers, "repository": i.repository, "tag": i.registry_tag}
            for variant, i in source.variants.items()}


def daemon_policy_arg(pid: int) -> str | None:
    """The daemon's ``--policy`` argument as it runs (None: not given, its default applies)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    return argv[argv.index("--policy") + 1] if "--policy" in argv[:-1] else None


def link_utilisation(nbytes: int, profile: Profile, seconds: float) -> float | None:
    """Bytes the registry sent over what the link could have carried from the start of the
    pull to readiness (bytes sent after readiness count too); None on an unshaped link."""
    if not profile.shaped or seconds <= 0:
        return None
    assert profile.rate_mbit is not None
    return round(nbytes * 8 / (profile.rate_mbit * 1e6 * seconds), 4)


def _delta(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return round(after - before, 3)
