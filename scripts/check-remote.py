"""Fail when a DVC remote cannot be read (network, credentials, a wrong URL); an empty remote is fine.

    python scripts/check-remote.py [--remote NAME]     # the default remote when no name is given

CI runs it before `dvc pull --allow-missing`, because that pull cannot tell the two apart: it asks the
remote about each object, and a remote that refuses the connection (or the credentials) reads as one
that lacks every object, so the pull "succeeds" and the job silently reproduces everything. Listing the
remote's root raises instead. A root that does not exist yet is a remote nothing was pushed to (the first
run, or an expired Actions cache): that is reported and tolerated, and the first `dvc push` creates it.
"""

from __future__ import annotations

import sys

import click

EMPTY = "answers but holds nothing yet: dvc repro rebuilds everything"


def probe(fs, path: str) -> tuple[bool, str]:
    """(readable, what was found) for the remote root at path on fs."""
    try:
        fs.ls(path, detail=False)
    except FileNotFoundError:
        return True, EMPTY
    except NotImplementedError:  # HTTP remotes cannot list: ask for the root itself
        try:
            fs.info(path)
        except FileNotFoundError as exc:
            # fsspec's HTTP filesystem turns every failure into FileNotFoundError: a status code in its
            # cause means the server answered (404 for a folder is normal), none means it never did.
            status = getattr(exc.__cause__, "status", None)
            if status in (401, 403):
                return False, f"the server refused the credentials (HTTP {status})"
            if status is None:
                return False, f"no answer: {type(exc.__cause__).__name__}: {exc.__cause__}"
            return True, EMPTY
        except Exception as exc:  # whatever went wrong is what to report
            return False, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # credentials, network, a wrong bucket: all end the job
        return False, f"{type(exc).__name__}: {exc}"
    return True, "answers"


@click.command()
@click.option("--remote", "name", default=None, help="Remote name (default: core.remote of .dvc/config).")
@click.option("--repo", "root", default=".", show_default=True, type=click.Path(exists=True, file_okay=False))
def main(name: str | None, root: str) -> None:
    from dvc.repo import Repo

    with Repo(root) as repo:
        remote = repo.cloud.get_remote(name, command="pull")
        readable, what = probe(remote.fs, remote.path)
    if not readable:
        click.echo(f"remote '{remote.name}' ({remote.path}) cannot be read: {what}", err=True)
        sys.exit(1)
    click.echo(f"remote '{remote.name}' ({remote.path}) {what}")


if __name__ == "__main__":
    main()
