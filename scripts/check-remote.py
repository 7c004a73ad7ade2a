"""Fail when a DVC remote cannot be read (network, credentials, a wrong URL); an empty remote is fine.

    python scripts/check-remote.py [--remote NAME]     # the default remote when no name is given

`make pull`, `make push` and CI run it before dvc, because `dvc pull --allow-missing` cannot tell the two
apart: it asks the remote about each object, and a remote that refuses the connection (or the credentials)
reads as one that lacks every object, so the pull "succeeds" and the job silently reproduces everything.
Listing the remote's root raises instead. A root that does not exist yet is a remote nothing was pushed to
(the first run, or an expired Actions cache): that is reported and tolerated, and the first `dvc push`
creates it. An S3 bucket that does not exist is not: it is a misspelt URL (or the wrong account), and no
push would create it. Whatever fails is said on one line on stderr, with exit status 1.
"""

from __future__ import annotations

import sys

import click

EMPTY = "answers but holds nothing yet: dvc repro rebuilds everything"


def one_line(exc: BaseException) -> str:
    """'Type: message' on one line (botocore and asyncssh messages can carry newlines)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def missing_bucket(exc: FileNotFoundError) -> bool:
    """s3fs raises FileNotFoundError both for a missing prefix and a missing bucket; botocore's code tells."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "NoSuchBucket"


def probe(fs, path: str) -> tuple[bool, str]:
    """(readable, what was found) for the remote root at path on fs."""
    try:
        fs.ls(path, detail=False)
    except FileNotFoundError as exc:
        if missing_bucket(exc):
            return False, f"the bucket does not exist ({exc})"
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
                return False, f"no answer: {one_line(exc.__cause__)}"
            return True, EMPTY
        except Exception as exc:  # whatever went wrong is what to report
            return False, one_line(exc)
    except Exception as exc:  # credentials, network, a wrong bucket: all end the job
        return False, one_line(exc)
    return True, "answers"


@click.command()
@click.option("--remote", "name", default=None, help="Remote name (default: core.remote of .dvc/config).")
@click.option("--repo", "root", default=".", show_default=True, type=click.Path(exists=True, file_okay=False))
def main(name: str | None, root: str) -> None:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc_objects.fs.errors import RemoteMissingDepsError

    with Repo(root) as repo:
        try:
            remote = repo.cloud.get_remote(name, command="pull")
        except RemoteMissingDepsError as exc:
            click.echo(f"remote {exc.url} needs dvc-{exc.protocol}: pip install -e '.[remote]'", err=True)
            sys.exit(1)
        except DvcException as exc:  # no remote configured, an unknown name, a malformed URL
            click.echo(f"no usable remote: {' '.join(str(exc).split())}", err=True)
            sys.exit(1)
        readable, what = probe(remote.fs, remote.path)
        url = remote.fs.unstrip_protocol(remote.path)
    if not readable:
        click.echo(f"remote '{remote.name}' ({url}) cannot be read: {what}", err=True)
        sys.exit(1)
    click.echo(f"remote '{remote.name}' ({url}) {what}")


if __name__ == "__main__":
    main()
