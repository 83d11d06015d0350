"""Experiment files: a TOML description of a cold-start matrix, parsed and checked.

```toml
name = "coldstart"
repetitions = 3
modes = ["overlayfs", "lazy", "warm"]   # see lazyfs.bench.modes.MODES
serve = ["fuse", "kernel"]               # optional: the snapshotter's [daemon] serve, per lazyfs mode
policies = ["default", ["none"], ["readahead", "trace", "locality"]]
                                         # optional: [daemon] policies, per lazyfs mode
                                         # ("default": none configured, the daemon's default)
timeout_s = 300                          # per container run
registry_root = ""                       # registry storage ("" = <image cache>/registry)
chunk_size = "1M"                        # lazyfs convert --chunk-size

[[images]]
name = "debian-python"
recipe = "debian-python"                 # a built-in recipe, built offline (cached)
# ref = "oci:DIR:TAG"                    # or an existing OCI layout instead of a recipe

[[workloads]]                            # optional: default = each recipe's own workload
name = "import-json"
images = ["debian-python"]               # optional: default = every image
command = ["python3", "-c", "import json; print('ready')"]
ready = "^ready$"                        # regex on a stdout line, or "exit" (exit status 0)

[[profiles]]
name = "100mbit-20ms"
rate_mbit = 100
rtt_ms = 20
# name = "loopback" without rate/rtt: the registry on 127.0.0.1, no shaping
```

The matrix is images x workloads x cells x profiles x repetitions, where a cell is a mode
with, for lazyfs modes, one serving mode and one policy set (every combination; overlayfs
runs once, neither applies to it); ``runs()`` lists it in execution order (cells
interleaved within a repetition, so slow drifts of the machine hit every cell alike).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import BenchError

READY_ON_EXIT = "exit"
LOOPBACK = "loopback"
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SERVE_MODES = ("fuse", "kernel")
DEFAULT_POLICIES = "default"  # no policies configured: whatever the daemon does by default
# Modes that do not use lazyfs: serving mode and policies do not apply (lazyfs.bench.modes
# agrees: their snapshotter is not lazyfs).
NOT_LAZYFS_MODES = frozenset({"overlayfs"})


class ExperimentError(BenchError):
    """The experiment file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ImageSpec:
    name: str
    recipe: str | None = None  # built-in recipe name (lazyfs.bench.recipes)
    ref: str | None = None     # an existing image: "oci:DIR[:TAG]"


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    command: tuple[str, ...] | None  # None: the image recipe's own workload
    ready: str | None                # regex, READY_ON_EXIT, or None: the recipe's ready line
    images: tuple[str, ...] | None = None

    def applies_to(self, image: str) -> bool:
        return self.images is None or image in self.images


@dataclass(frozen=True)
class Profile:
    name: str
    rate_mbit: float | None = None  # None with rtt_ms None: loopback, no shaping
    rtt_ms: float | None = None

    @property
    def shaped(self) -> bool:
        return self.rate_mbit is not None


@dataclass(frozen=True)
class RunKey:
    """One cell of the matrix, one repetition."""
    image: str
    workload: str
    mode: str
    profile: str
    repetition: int
    serve: str | None = None                 # None: not a dimension (or overlayfs)
    policies: tuple[str, ...] | None = None  # None: not a dimension (or overlayfs); () default

    @property
    def run_id(self) -> str:
        parts = [self.image, self.workload, self.mode]
        if self.serve is not None:
            parts.append(self.serve)
        if self.policies is not None:
            parts.append(policies_slug(self.policies))
        return ".".join([*parts, self.profile, str(self.repetition)])


def policies_label(policies: tuple[str, ...] | list[str] | None) -> str:
    """How a policy set is shown: "readahead,trace"; "default" for none configured."""
    if policies is None:
        return ""
    return ",".join(policies) if policies else DEFAULT_POLICIES


def policies_slug(policies: tuple[str, ...]) -> str:
    """The policy set as one run-id part (no dots: module paths have them)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", "+".join(policies)) if policies else DEFAULT_POLICIES


@dataclass(frozen=True)
class Experiment:
    name: str
    images: tuple[ImageSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    modes: tuple[str, ...]
    profiles: tuple[Profile, ...]
    repetitions: int = 3
    timeout_s: float = 300.0
    registry_root: str = ""
    chunk_size: int = 1 << 20
    serve: tuple[str, ...] | None = None                 # None: the snapshotter's default
    policies: tuple[tuple[str, ...], ...] | None = None  # None: the daemon's default; () in it too
    source: str = field(default="", compare=False)  # the TOML text it was read from

    def workloads_for(self, image: str) -> list[WorkloadSpec]:
        return [w for w in self.workloads if w.applies_to(image)]

    def cells(self) -> list[tuple[str, str | None, tuple[str, ...] | None]]:
        """(mode, serving mode, policies) in execution order within a repetition: each mode
        with each serving mode and policy set (serving modes alternate innermost-but-one, so
        the two serving modes of a mode run side by side)."""
        cells: list[tuple[str, str | None, tuple[str, ...] | None]] = []
        for mode in self.modes:
            if mode in NOT_LAZYFS_MODES:
                cells.append((mode, None, None))
                continue
            for policies in self.policies if self.policies is not None else (None,):
                for serve in self.serve if self.serve is not None else (None,):
                    cells.append((mode, serve, policies))
        return cells

    def runs(self) -> list[RunKey]:
        keys = []
        for profile in self.profiles:
            for image in self.images:
                for workload in self.workloads_for(image.name):
                    for rep in range(self.repetitions):
                        for mode, serve, policies in self.cells():
                            keys.append(RunKey(image.name, workload.name, mode, profile.name, rep,
                                               serve, policies))
        return keys

    def only_images(self, names: list[str]) -> Experiment:
        """The same experiment for some of its images (``lazyfs bench run --image``)."""
        unknown = set(names) - {i.name for i in self.images}
        if unknown:
            raise ExperimentError(f"--image: no image {', '.join(sorted(unknown))} in the experiment "
                                  f"(it has {', '.join(i.name for i in self.images)})")
        images = tuple(i for i in self.images if i.name in names)
        workloads = tuple(w for w in self.workloads if any(w.applies_to(i.name) for i in images))
        note = f"# run for the images {', '.join(i.name for i in images)} only (--image)\n"
        return replace(self, images=images, workloads=workloads, source=note + self.source)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("source")
        # Experiments without the newer dimensions keep the fingerprint they always had.
        for key in ("serve", "policies"):
            if data[key] is None:
                data.pop(key)
        return data

    def fingerprint(self) -> str:
        """Identifies the matrix and its settings: a resumed experiment must have the same."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ExperimentError(f"not a size: {value!r} (examples: 1048576, 64K, 1M)")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ExperimentError(f"{what}: {value!r} is not a valid name (letters, digits, . _ -)")
    return value


def _table_list(raw: dict, key: str) -> list[dict]:
    value = raw.pop(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ExperimentError(f"{key}: expected an array of tables ([[{key}]])")
    return value


def _no_extra(table: dict, where: str) -> None:
    if table:
        raise ExperimentError(f"{where}: unknown keys {', '.join(sorted(table))}")


def _parse_image(t: dict) -> ImageSpec:
    t = dict(t)
    name = _name(t.pop("name", None), "images.name")
    recipe, ref = t.pop("recipe", None), t.pop("ref", None)
    _no_extra(t, f"image {name}")
    if (recipe is None) == (ref is None):
        raise ExperimentError(f"image {name}: give exactly one of recipe = NAME or ref = \"oci:DIR:TAG\"")
    if ref is not None and not str(ref).startswith("oci:"):
        raise ExperimentError(f"image {name}: ref must be an OCI layout, oci:DIR[:TAG]")
    return ImageSpec(name, recipe, ref)


def _parse_workload(t: dict, image_names: set[str]) -> WorkloadSpec:
    t = dict(t)
    name = _name(t.pop("name", None), "workloads.name")
    command = t.pop("command", None)
    ready = t.pop("ready", None)
    images = t.pop("images", None)
    _no_extra(t, f"workload {name}")
    if command is not None and (not isinstance(command, list) or not command
                                or not all(isinstance(a, str) for a in command)):
        raise ExperimentError(f"workload {name}: command must be a non-empty array of strings")
    if command is not None and ready is None:
        raise ExperimentError(f"workload {name}: a command needs ready = REGEX or ready = \"exit\"")
    if ready is not None and ready != READY_ON_EXIT:
        try:
            re.compile(ready)
        except re.error as e:
            raise ExperimentError(f"workload {name}: ready is not a regex: {e}") from None
    if images is not None:
        unknown = set(images) - image_names
        if unknown:
            raise ExperimentError(f"workload {name}: unknown images {', '.join(sorted(unknown))}")
    return WorkloadSpec(name, tuple(command) if command else None, ready,
                        tuple(images) if images is not None else None)


def _parse_profile(t: dict) -> Profile:
    t = dict(t)
    name = _name(t.pop("name", None), "profiles.name")
    rate, rtt = t.pop("rate_mbit", None), t.pop("rtt_ms", None)
    _no_extra(t, f"profile {name}")
    if rate is None and rtt is None:
        return Profile(name)
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise ExperimentError(f"profile {name}: rate_mbit must be a positive number")
    rtt = 0.0 if rtt is None else rtt
    if not isinstance(rtt, (int, float)) or rtt < 0:
        raise ExperimentError(f"profile {name}: rtt_ms must be a number >= 0")
    return Profile(name, float(rate), float(rtt))


def _parse_serve(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value or len(set(value)) != len(value)
            or not all(v in SERVE_MODES for v in value)):
        raise ExperimentError(f"serve must be a non-empty array of distinct serving modes "
                              f"({', '.join(SERVE_MODES)}), got {value!r}")
    return tuple(value)


def _parse_policy_set(value: object) -> tuple[str, ...]:
    """One policy set: "default", "trace,locality" or ["trace", "locality"]."""
    from lazyfs.fetch.policy_names import PolicyError, parse_policy_names

    if value == DEFAULT_POLICIES:
        return ()
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ExperimentError(f"policies: {value!r} is not a list of policy names")
    if not isinstance(value, (str, list)):
        raise ExperimentError(f"policies: {value!r} is not a policy set "
                              "(\"default\", \"NAME,NAME\" or [\"NAME\", ...])")
    try:
        return tuple(parse_policy_names(value))
    except PolicyError as e:
        raise ExperimentError(f"policies: {e}") from None


def _parse_policies(value: object) -> tuple[tuple[str, ...], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ExperimentError("policies must be a non-empty array of policy sets, e.g. "
                              "[\"default\", [\"none\"], [\"trace\", \"locality\"]]")
    sets = tuple(_parse_policy_set(v) for v in value)
    if len(set(sets)) != len(sets):
        raise ExperimentError("policies: the same policy set is listed twice")
    return sets


def apply_overrides(text: str, overrides: list[str]) -> str:
    """The experiment's TOML with top-level keys replaced: each override is ``KEY=VALUE``
    with VALUE in TOML (``repetitions=2``, ``modes=["overlayfs","lazy"]``). The result is
    TOML again, so what a results directory records is the experiment as run."""
    if not overrides:
        return text
    values: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[a-z_]+", key) or key in ("images", "workloads", "profiles"):
            raise ExperimentError(f"override {item!r}: expected KEY=VALUE for a top-level key "
                                  "(name, repetitions, modes, serve, policies, timeout_s, ...)")
        try:
            tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError as e:
            raise ExperimentError(f"override {item!r}: the value is not TOML: {e}") from None
        values[key] = value.strip()
    # The overrides, then the file's top-level lines without the overridden keys (single-line
    # values only), then its tables as they were.
    body = text.splitlines()
    first_table = next((i for i, line in enumerate(body) if line.lstrip().startswith("[")), len(body))
    head = [line for line in body[:first_table]
            if not any(re.match(rf"\s*{key}\s*=", line) for key in values)]
    result = "\n".join(["# overridden on the command line:", *(f"{k} = {v}" for k, v in values.items()),
                        *head, *body[first_table:]]) + "\n"
    try:
        tomllib.loads(result)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"overrides {', '.join(values)}: the experiment's own value spans "
                              f"several lines; edit the file instead ({e})") from None
    return result


def parse_experiment(text: str, known_modes: set[str] | None = None) -> Experiment:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"not valid TOML: {e}") from None
    name = _name(raw.pop("name", "experiment"), "name")
    images = tuple(_parse_image(t) for t in _table_list(raw, "images"))
    if not images:
        raise ExperimentError("no [[images]]")
    image_names = {i.name for i in images}
    if len(image_names) != len(images):
        raise ExperimentError("image names must be unique")
    workloads = tuple(_parse_workload(t, image_names) for t in _table_list(raw, "workloads"))
    if not workloads:
        if any(i.recipe is None for i in images):
            raise ExperimentError("images given by ref need [[workloads]] (no recipe workload)")
        workloads = (WorkloadSpec("default", None, None),)
    if len({w.name for w in workloads}) != len(workloads):
        raise ExperimentError("workload names must be unique")
    for w in workloads:
        if w.command is None:
            for image in images:
                if w.applies_to(image.name) and image.recipe is None:
                    raise ExperimentError(f"workload {w.name} has no command, and image {image.name} "
                                          "has no recipe workload")
    profiles = tuple(_parse_profile(t) for t in _table_list(raw, "profiles")) or (Profile(LOOPBACK),)
    if len({p.name for p in profiles}) != len(profiles):
        raise ExperimentError("profile names must be unique")
    modes = raw.pop("modes", ["overlayfs", "lazy"])
    if not isinstance(modes, list) or not modes or len(set(modes)) != len(modes):
        raise ExperimentError("modes must be a non-empty array of distinct names")
    if known_modes is not None:
        unknown = [m for m in modes if m not in known_modes]
        if unknown:
            raise ExperimentError(f"unknown modes {', '.join(unknown)} (known: {', '.join(sorted(known_modes))})")
    repetitions = raw.pop("repetitions", 3)
    if not isinstance(repetitions, int) or not 1 <= repetitions <= 1000:
        raise ExperimentError("repetitions must be an integer from 1 to 1000")
    timeout = raw.pop("timeout_s", 300)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ExperimentError("timeout_s must be a positive number")
    registry_root = raw.pop("registry_root", "")
    if not isinstance(registry_root, str):
        raise ExperimentError("registry_root must be a string")
    chunk_size = parse_size(raw.pop("chunk_size", 1 << 20))
    serve = _parse_serve(raw.pop("serve", None))
    policies = _parse_policies(raw.pop("policies", None))
    _no_extra(raw, "experiment")
    return Experiment(name=name, images=images, workloads=workloads, modes=tuple(modes),
                      profiles=profiles, repetitions=repetitions, timeout_s=float(timeout),
                      registry_root=registry_root, chunk_size=chunk_size, serve=serve,
                      policies=policies, source=text)


def load_experiment(path: Path, known_modes: set[str] | None = None,
                    overrides: list[str] | None = None) -> Experiment:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ExperimentError(f"{path}: {e}") from None
    try:
        return parse_experiment(apply_overrides(text, overrides or []), known_modes)
    except ExperimentError as e:
        raise ExperimentError(f"{path}: {e}") from None


BUILTIN_DIR = Path(__file__).resolve().parent / "experiments"


def resolve_experiment_path(name_or_path: str) -> Path:
    """A path, or the name of a built-in experiment ("ci-small", "coldstart")."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = BUILTIN_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.toml")))
    raise ExperimentError(f"{name_or_path}: no such file or built-in experiment (built-in: {known})")
