"""Command-line options that several commands share, defined once.

Every command that talks to a registry (convert, inspect, mount, trace record, daemon) takes
the same registry options, with defaults from the configuration file (lazyfs.config):

    --insecure-registry HOST[:PORT]   plain HTTP (repeatable; added to the file's list)
    --hosts-dir DIR                   containerd hosts.toml directory ("" for none)
    --registry-auth FILE              Docker config.json with the credentials
    --config FILE                     the configuration file
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from lazyfs.config import Config, RegistrySettings, load_config


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry access")
    group.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                       help="reach this registry over plain HTTP (repeatable; loopback registries always are)")
    group.add_argument("--hosts-dir", default=None, metavar="DIR",
                       help="containerd hosts.toml directory naming mirrors (default: [registry] hosts_dir "
                            "of the config file, else /etc/containerd/certs.d; \"\" for none)")
    group.add_argument("--registry-auth", type=Path, default=None, metavar="FILE",
                       help="Docker config.json holding registry credentials "
                            "(default: $DOCKER_CONFIG/config.json or ~/.docker/config.json)")
    group.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="lazyfs configuration file: cache and registry defaults "
                            "(default: $LAZYFS_CONFIG or /etc/lazyfs/lazyfs.toml)")


def load_with_registry(args: argparse.Namespace) -> tuple[Config, RegistrySettings]:
    """The configuration file (ConfigError if unreadable) and the registry settings the
    command line makes of it."""
    config = load_config(args.config)
    settings = config.registry
    if args.insecure_registry:
        settings = replace(settings, insecure=(*settings.insecure, *args.insecure_registry))
    if args.hosts_dir is not None:
        settings = replace(settings, hosts_dir=Path(args.hosts_dir) if args.hosts_dir else None)
    if args.registry_auth is not None:
        settings = replace(settings, auth_file=args.registry_auth)
    return config, settings
