"""``fedcore certs``: a CA, the SuperLink's TLS certificate and one key pair per site.

    fedcore certs DIR [--san NAME_OR_IP ...] [--sites N | --site NAME ...] [--port PORT]
    fedcore certs DIR --add-site NAME [--signing-key HEX]     (a site joining later)
    fedcore certs DIR --issue NAME --signing-key HEX          (the CA holder, ACTIVE mode)
    fedcore certs STATE_DIR --show-signing-key --site-id I    (on a site, ACTIVE mode)

Writes the files of :mod:`fedcore.deploy.pki` into ``DIR`` (never overwriting) and prints the
commands that start the SuperLink, register the sites and start each site's SuperNode.
``--add-site`` adds a site to the federation of an existing ``DIR``: its key pair is written with
the CA already there (which is never replaced: a new CA would lock every site out) and the
commands that register and start it are printed. For
ACTIVE-mode secure aggregation, a site prints its public signing key (creating its key and round
journal in its ``state-dir`` if needed) and the CA holder issues the certificate that binds it to
the site's name (:mod:`fedcore.federation.site.registry`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.cli import counted
from fedcore.errors import ConfigError

if TYPE_CHECKING:
    from fedcore.deploy.pki import CertLayout

DEFAULT_PORT = 9092
STATE_DIR = "/var/lib/fedcore"  # the site's own folder for its keys, round journal and ledger
CONNECTION = "fedcore"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "certs",
        help="create a CA, a SuperLink certificate and site authentication keys",
        description=(
            "Create a CA, a TLS certificate for the SuperLink (with the given subject alternative "
            "names plus localhost, 127.0.0.1 and ::1) and one node-authentication key pair per "
            "site, then print the commands that use them. --add-site adds a site to an existing "
            "folder's federation, with its CA."
        ),
    )
    parser.add_argument(
        "directory",
        metavar="DIR",
        help="folder to write (must not hold these files yet); with --add-site or --issue, the "
        "folder that holds the federation's CA",
    )
    parser.add_argument(
        "--san",
        metavar="NAME_OR_IP",
        action="append",
        default=[],
        help="a host name or IP address the SuperLink is reached at (repeatable)",
    )
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--sites",
        type=int,
        default=None,
        metavar="N",
        help="key pairs site-0..site-N-1 (default 3)",
    )
    who.add_argument(
        "--site", action="append", default=[], metavar="NAME", help="a named site (repeatable)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"SuperLink port in the printed commands (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--valid-days", type=int, default=825, help="certificate lifetime (default 825)"
    )
    _add_later_arguments(parser)
    return parser


def _add_later_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that work on the folder of an existing federation: a site added later, and
    ACTIVE-mode secure aggregation's certificates."""
    later = parser.add_argument_group("a site joining a federation whose CA is in DIR")
    later.add_argument(
        "--add-site",
        metavar="NAME",
        action="append",
        default=[],
        help="write site NAME's key pair beside the others, reusing the CA and the SuperLink "
        "certificate in DIR (repeatable; with --signing-key, also its secure-aggregation "
        "certificate)",
    )
    secagg = parser.add_argument_group("ACTIVE-mode secure aggregation")
    secagg.add_argument(
        "--issue",
        metavar="NAME",
        help="certify site NAME's signing key with the CA in DIR (writes DIR/sites/NAME.secagg.crt)",
    )
    secagg.add_argument(
        "--signing-key",
        metavar="HEX",
        action="append",
        default=[],
        help="the key --issue certifies (with --add-site: one per site, in the same order)",
    )
    secagg.add_argument(
        "--show-signing-key",
        action="store_true",
        help="on a site: print its public signing key; DIR is the site's state-dir",
    )
    secagg.add_argument(
        "--site-id", type=int, default=None, help="with --show-signing-key: the site's partition id"
    )


def run(args: argparse.Namespace) -> int:
    from fedcore.deploy.pki import issue_secagg_certificate, site_names, write_certs

    if args.show_signing_key:
        from fedcore.federation.site.registry import signing_public_key
        from fedcore.federation.site.store import SiteStore

        if args.site_id is None:
            raise ConfigError("--show-signing-key needs --site-id (the site's partition id)")
        print(signing_public_key(SiteStore(Path(args.directory), args.site_id)).hex())
        return 0
    if args.issue is not None:
        if len(args.signing_key) != 1:
            raise ConfigError("--issue needs one --signing-key HEX (what the site printed)")
        path = issue_secagg_certificate(
            Path(args.directory),
            name=args.issue,
            signing_key=args.signing_key[0],
            valid_days=args.valid_days,
        )
        print(
            f"Wrote {path}. Copy it to the site as the file its node config's "
            "'secagg-certificate' names (default <state-dir>/site-<partition id>.secagg.cert.pem)."
        )
        return 0

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.add_site:
        return add_site(args)
    if args.signing_key:
        raise ConfigError("--signing-key goes with --issue NAME or --add-site NAME")
    names = tuple(args.site) if args.site else site_names(3 if args.sites is None else args.sites)
    files = write_certs(
        Path(args.directory), sans=args.san, names=names, valid_days=args.valid_days
    )
    host = next((s for s in args.san if s not in ("localhost", "127.0.0.1", "::1")), "127.0.0.1")
    print(instructions(files, host=host, port=args.port))
    return 0


def add_site(args: argparse.Namespace) -> int:
    """``--add-site NAME ...``: new sites' key pairs (and certificates) with the CA in DIR, and
    the commands that register and start them."""
    from fedcore.crypto.certs import LOOPBACK_SANS, certificate_sans
    from fedcore.deploy.pki import add_sites, existing_sites

    if args.site or args.sites is not None:
        raise ConfigError(
            "--add-site adds to the folder's federation; --sites and --site make a new one"
        )
    directory = Path(args.directory)
    before = len(existing_sites(directory))
    files, issued = add_sites(
        directory, names=args.add_site, signing_keys=args.signing_key, valid_days=args.valid_days
    )
    sans = list(args.san)
    if not sans and files.superlink_certificate.is_file():
        sans = list(certificate_sans(files.superlink_certificate.read_bytes()))
    host = next((s for s in sans if s not in LOOPBACK_SANS), "127.0.0.1")
    address = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    total = before + len(files.sites)
    lines = [
        f"Wrote {counted(len(files.sites), 'key pair')} to {files.directory / 'sites'} with the CA "
        f"already in {files.directory} (ca.crt, the SuperLink's certificate and the sites "
        "registered before are unchanged; the SuperLink keeps running).",
        *(f"  secure-aggregation certificate {path}" for path in issued),
    ]
    register, supernode = (
        _unnumbered(_register_step(files)),
        _unnumbered(_supernode_step(files, address=address, first=before, total=total)),
    )
    sections = [
        lines,
        register,
        supernode,
        [
            f"The federation now has {counted(total, 'site')}: start its next run with sites={total}."
        ],
    ]
    print("\n\n".join("\n".join(section) for section in sections))
    return 0


def _unnumbered(lines: list[str]) -> list[str]:
    """A step of :func:`instructions` without its number (``3. Register`` -> ``Register``)."""
    return [lines[0].split(". ", 1)[-1], *lines[1:]] if lines else lines


# Step 4's epilogue: how ACTIVE-mode sites get their secure-aggregation certificates.
ACTIVE_SECAGG_STEPS = """\
   ACTIVE-mode secure aggregation (secagg.mode=active): on each site print its signing key,
     fedcore certs {state_dir} --show-signing-key --site-id I
   the CA holder certifies it (writes sites/NAME.secagg.crt; copy it to the site as \
{state_dir}/site-I.secagg.cert.pem),
     fedcore certs {directory} --issue NAME --signing-key HEX
   and each site adds to its --node-config: \
secagg-mode="active" secagg-ca="{state_dir}/ca.crt" secagg-registry="/shared/registry"
   (copy ca.crt there; the registry folder is shared by the sites, see docs/deployment.md)."""


def instructions(files: CertLayout, *, host: str, port: int) -> str:
    """The commands that use a certificate folder, as text to print: the files written, then
    the five steps of a deployment across hosts."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sections = [
        _files_written(files),
        _superlink_step(files, port=port),
        _flwr_connection_step(files, address=address),
        _register_step(files),
        _supernode_step(files, address=address),
        _run_step(files),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)


def _files_written(files: CertLayout) -> list[str]:
    d = files.directory
    return [
        f"Wrote {len(files.files())} files to {d} (private keys mode 0600).",
        f"  CA certificate      {files.ca_certificate}   -> every site and every flwr user",
        f"  CA key              {files.ca_key}   -> keep offline",
        f"  SuperLink cert/key  {files.superlink_certificate}, {files.superlink_key}"
        "   -> SuperLink host only",
        f"  site keys           {d / 'sites'}/NAME.key -> that site only;"
        " NAME.pub -> registered below",
    ]


def _superlink_step(files: CertLayout, *, port: int) -> list[str]:
    from fedcore.deploy import commands as cmd

    superlink = cmd.superlink_argv(
        Path(""), host="0.0.0.0", port=port, tls=files.tls, node_auth=True
    )
    return [
        f"1. On the SuperLink host (open TCP port {port} to the sites and to flwr users):",
        "   " + cmd.shell_line(superlink),
    ]


def _flwr_connection_step(files: CertLayout, *, address: str) -> list[str]:
    return [
        "2. Where you run flwr (the operator): add this connection to $FLWR_HOME/config.toml "
        "(default ~/.flwr/config.toml):",
        f"   [superlink.{CONNECTION}]",
        f'   address = "{address}"',
        f'   root-certificates = "{files.ca_certificate}"',
    ]


def _register_step(files: CertLayout) -> list[str]:
    from fedcore.deploy import commands as cmd

    lines = ["3. Register the sites (the operator, once per site):"]
    for site in files.sites:
        argv = cmd.register_argv(
            Path(""), public_key=site.public_key, connection=CONNECTION, name=site.name
        )
        lines.append("   " + cmd.shell_line(argv))
    return lines


def _supernode_step(
    files: CertLayout, *, address: str, first: int = 0, total: int | None = None
) -> list[str]:
    """Each site's ``flower-supernode`` command; the sites' partition ids start at ``first`` of
    ``total`` (default: these sites are the whole federation)."""
    from fedcore.deploy import commands as cmd

    total = len(files.sites) if total is None else total
    lines = ["4. On each site's host (copy ca.crt and that site's .key there first):"]
    for i, site in enumerate(files.sites, start=first):
        node = cmd.supernode_argv(
            Path(""),
            superlink=address,
            root_certificates=Path("ca.crt"),
            private_key=Path(site.private_key.name),
            node_config={
                "partition-id": i,
                "num-partitions": total,
                "state-dir": STATE_DIR,
            },
            port=9094,
        )
        lines.append(
            f"   # {site.name}: partition {i} of the run's dataset; for the site's own file use "
            f'--node-config \'data-path="/data/site.npz" state-dir="{STATE_DIR}"\''
        )
        lines.append("   " + cmd.shell_line(node))
    lines += ["", ACTIVE_SECAGG_STEPS.format(state_dir=STATE_DIR, directory=files.directory)]
    return lines


def _run_step(files: CertLayout) -> list[str]:
    run_config = f'sites={len(files.sites)} rounds=3 out="/abs/path/on/superlink/host"'
    argv = ["flwr", "run", ".", CONNECTION, "--stream", "--run-config", run_config]
    return ["5. Start a run (the operator, in the fedcore checkout):", "   " + shlex.join(argv)]
