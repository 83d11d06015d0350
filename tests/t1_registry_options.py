"""Registry options shared by every command that talks to a registry, the configuration
file's [registry] table, the snapshotter configuration reaching every daemon option, and
hosts.toml parsing (lazyfs.registry.hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.cli import build_parser
from lazyfs.cliopts import load_with_registry
from lazyfs.config import DEFAULT_HOSTS_DIR, ConfigError, RegistrySettings, load_config
from lazyfs.registry import open_store
from lazyfs.registry.hosts import HostsConfigError, RegistryHost, hosts_file, registry_hosts

REGISTRY_COMMANDS = {
    "convert": ["SRC", "DST"],
    "inspect": ["REF"],
    "mount": ["IMAGE", "/mnt"],
    "daemon": ["--socket", "/s", "--fuse-dir", "/f"],
    "trace record": ["IMAGE", "-o", "OUT"],
    "trace stats": ["--image", "IMAGE", "T"],
}


@pytest.mark.parametrize("command", sorted(REGISTRY_COMMANDS))
def test_every_registry_command_takes_the_same_registry_options(command, tmp_path):
    (tmp_path / "lazyfs.toml").write_text('[registry]\ninsecure = ["a.example:5000"]\nhosts_dir = "/etc/x"\n')
    argv = [*command.split(), *REGISTRY_COMMANDS[command], "--insecure-registry", "b.example",
            "--hosts-dir", str(tmp_path / "certs.d"), "--registry-auth", str(tmp_path / "auth.json"),
            "--config", str(tmp_path / "lazyfs.toml")]
    if command == "trace record":
        argv += ["--", "true"]
    args = build_parser().parse_args(argv)
    _, settings = load_with_registry(args)
    assert settings == RegistrySettings(insecure=("a.example:5000", "b.example"), hosts_dir=tmp_path / "certs.d",
                                        auth_file=tmp_path / "auth.json")


def test_registry_settings_from_the_config_file(tmp_path):
    path = tmp_path / "lazyfs.toml"
    assert load_config(path).registry == RegistrySettings()  # no file: containerd's certs.d
    assert RegistrySettings().hosts_dir == DEFAULT_HOSTS_DIR == Path("/etc/containerd/certs.d")
    path.write_text('[registry]\nhosts_dir = ""\nauth_file = "/a.json"\n')
    assert load_config(path).registry == RegistrySettings(hosts_dir=None, auth_file=Path("/a.json"))
    args = build_parser().parse_args(["inspect", "R", "--config", str(path), "--hosts-dir", "/h"])
    assert load_with_registry(args)[1].hosts_dir == Path("/h")
    settings = RegistrySettings(insecure=("h:1",), hosts_dir=None, auth_file=Path("/a"))
    assert settings.daemon_arguments() == ["--insecure-registry", "h:1", "--hosts-dir", "", "--registry-auth", "/a"]
    for bad in ('[registry]\ninsecure = "h"\n', '[registry]\nmirrors = 1\n', 'registry = 3\n'):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(path)


def test_daemon_takes_what_the_commands_pass(tmp_path):
    from lazyfs.daemon.mountstate import daemon_command
    from lazyfs.daemon.server import add_daemon_arguments, options_from_args
    import argparse

    settings = RegistrySettings(insecure=("h:1",), hosts_dir=tmp_path / "certs.d", auth_file=tmp_path / "a.json")
    argv = daemon_command(fuse_dir=tmp_path / "f", socket=tmp_path / "s", cache_dir=tmp_path / "c", registry=settings)
    parser = argparse.ArgumentParser()
    add_daemon_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    options = options_from_args(parser.parse_args(argv[3:]))
    assert options.registry == settings
    assert "-v" not in argv  # the daemon's default level (INFO) logs attach, detach and failures


def test_snapshotter_config_reaches_every_daemon_option(tmp_path):
    """Every DaemonOptions field a service sets, and every attach option, from the config."""
    import argparse

    from lazyfs.daemon.server import DaemonOptions, add_daemon_arguments, options_from_args
    from snapshotter import config
    from snapshotter.daemon_client import DaemonLayerFS, DaemonSupervisor

    path = tmp_path / "sn.toml"
    path.write_text(f'root = "{tmp_path}"\n[daemon]\ncache_size = "1GiB"\nmetrics = "127.0.0.1:9100"\n'
                    'background_fetch = true\nbackground_rate = "10MiB"\nverbose = true\nprefetch = false\n'
                    'allow_suid_dev = true\nread_timeout = 20\nrequest_timeout = 2.5\nserve = "kernel"\nloop_direct_io = false\npolicies = ["trace", "locality"]\n'
                    f'[registry]\ninsecure_hosts = ["h:1"]\nhosts_dir = "{tmp_path}/certs.d"\n'
                    f'auth_file = "{tmp_path}/a.json"\n'
                    '[traces]\nquiet = 2.5\nmax_seconds = 60\nmax_bytes = "2MiB"\n')
    cfg = config.load(path)
    layerfs = DaemonLayerFS(cfg.daemon.control_socket, cfg.daemon.mountpoint, prefetch=cfg.daemon.prefetch,
                            background_fetch=cfg.daemon.background_fetch,
                            background_rate=cfg.daemon.background_rate)
    assert layerfs.background == {"background_fetch": True, "background_rate": 10 << 20}
    command = DaemonSupervisor(cfg, layerfs).command()
    parser = argparse.ArgumentParser()
    add_daemon_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(command[3:])
    options = options_from_args(args)
    assert args.verbose == 1
    assert (options.fuse_dir, options.socket_path, options.cache_dir, options.cache_size) == (
        tmp_path / "chunk-devices", tmp_path / "daemon.sock", tmp_path / "cache", 1 << 30)
    assert (options.serve, options.layers_dir, options.loop_direct_io) == ("kernel", tmp_path / "mnt", False)
    assert options.metrics == ("127.0.0.1", 9100)
    assert (options.read_timeout, options.request_timeout) == (20.0, 2.5)
    assert options.registry == RegistrySettings(insecure=("h:1",), hosts_dir=tmp_path / "certs.d",
                                                auth_file=tmp_path / "a.json")
    assert options.allow_suid_dev is True and {"nosuid", "nodev"}.isdisjoint(options.fuse_options)
    assert (options.recording.quiet, options.recording.max_duration, options.recording.max_bytes) == (
        2.5, 60.0, 2 << 20)
    assert options.policies == ("trace", "locality")
    # The fields left are the ones `lazyfs mount` alone sets (its startup spec and ready pipe)
    # and the one only an upgrade sets (the successor taking the running daemon's layers over).
    covered = {"fuse_dir", "socket_path", "cache_dir", "cache_size", "metrics", "registry", "recording",
               "allow_suid_dev", "serve", "layers_dir", "loop_direct_io", "policies",
               "read_timeout", "request_timeout"}
    assert set(DaemonOptions.__dataclass_fields__) - covered == {"startup", "ready_fd", "take_over"}


# -- hosts.toml ----------------------------------------------------------------------------

def _hosts(tmp_path: Path, name: str, text: str) -> Path:
    directory = tmp_path / "certs.d" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return tmp_path / "certs.d"


def test_hosts_file_lookup_order(tmp_path):
    certs = tmp_path / "certs.d"
    assert hosts_file(certs, "r.example:5000") is None
    _hosts(tmp_path, "_default", "")
    assert hosts_file(certs, "r.example:5000") == certs / "_default" / "hosts.toml"
    _hosts(tmp_path, "r.example:5000", "")
    assert hosts_file(certs, "r.example:5000") == certs / "r.example:5000" / "hosts.toml"
    _hosts(tmp_path, "r.example_5000_", "")
    assert hosts_file(certs, "r.example:5000") == certs / "r.example_5000_" / "hosts.toml"
    assert hosts_file(certs, "r.example") == certs / "_default" / "hosts.toml"


def test_registry_hosts_mirrors_in_order_then_the_server(tmp_path):
    certs = _hosts(tmp_path, "docker.io", '''
server = "https://registry-1.docker.io"
[host."http://mirror.rack1:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://mirror.rack1:5000".header]
    x-rack = "r1"
    x-two = ["a", "b"]
[host."https://public.example/team"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "mirror.crt"
[host."https://odd.example/v2/up"]
  override_path = true
  dial_timeout = "1m500ms"
''')
    hosts = registry_hosts("docker.io", "registry-1.docker.io", hosts_dir=certs, insecure=False)
    assert [h.api_root for h in hosts] == ["http://mirror.rack1:5000/v2", "https://public.example/team/v2",
                                          "https://odd.example/v2/up", "https://registry-1.docker.io/v2"]
    rack, public, odd, server = hosts
    assert rack.capabilities == {"pull", "resolve"} and public.capabilities == {"pull"}
    assert odd.capabilities == {"pull", "resolve", "push"} and not server.is_mirror
    assert rack.headers == (("x-rack", "r1"), ("x-two", "a"), ("x-two", "b"))
    assert public.skip_verify and public.ca == (certs / "docker.io" / "mirror.crt",) and public.needs_own_tls
    assert not rack.needs_own_tls and not rack.needs_own_client  # plain HTTP, no timeout of its own
    assert odd.dial_timeout == 60.5 and odd.needs_own_client and not odd.needs_own_tls
    assert rack.url("library/app", "/blobs/sha256:ab") == "http://mirror.rack1:5000/v2/library/app/blobs/sha256:ab?ns=docker.io"
    assert server.url("library/app", "/manifests/v1") == "https://registry-1.docker.io/v2/library/app/manifests/v1"


def test_registry_hosts_defaults(tmp_path):
    assert registry_hosts("r:5", "r:5", hosts_dir=None, insecure=True) == [RegistryHost("http://r:5/v2")]
    assert registry_hosts("r:5", "r:5", hosts_dir=tmp_path, insecure=False) == [RegistryHost("https://r:5/v2")]
    certs = _hosts(tmp_path, "_default", '[host."m:1"]\n')  # no scheme: as the registry's own
    hosts = registry_hosts("r:5", "r:5", hosts_dir=certs, insecure=True)
    assert [h.api_root for h in hosts] == ["http://m:1/v2", "http://r:5/v2"] and hosts[0].namespace == "r:5"
    certs = _hosts(tmp_path, "_default", '[host."http://r:5"]\n')  # the registry listed as a host
    assert [h.namespace for h in registry_hosts("r:5", "r:5", hosts_dir=certs, insecure=True)] == [None, None]
    certs = _hosts(tmp_path, "_default", 'server = "http://only-mirror:1"\n')  # only the mirror
    [only] = registry_hosts("r:5", "r:5", hosts_dir=certs, insecure=False)
    assert only.api_root == "http://only-mirror:1/v2" and only.namespace == "r:5"


@pytest.mark.parametrize("text", ['server = 1\n', '[host."ftp://x"]\n', '[host."http://x"]\ncapabilities = ["fly"]\n',
                                  '[host."http://x"]\nskip_verify = "yes"\n', '[host."http://x"]\ndial_timeout = "1 s"\n',
                                  '[host."http://x"]\ndial_timeout = 3\n', 'host = 3\n', 'not toml [\n',
                                  '[host."http://x"]\n[host."http://x".header]\nh = 1\n'])
def test_bad_hosts_toml_is_a_clear_error(tmp_path, text):
    certs = _hosts(tmp_path, "r:5", text)
    with pytest.raises(HostsConfigError, match="hosts.toml"):
        registry_hosts("r:5", "r:5", hosts_dir=certs, insecure=True)
    with pytest.raises(HostsConfigError):
        open_store("r:5/a:1", hosts_dir=certs)
