"""The remote cache over the protocols teams use, through the dvc-s3 and dvc-ssh of the `remote` extra.

S3 is moto's server on 127.0.0.1 with IAM checks on (only the key of a user it knows signs a request); SSH is
OpenSSH's sshd on 127.0.0.1 with throwaway keys, skipped only when sshd cannot start here. A two-stage pipeline in a
temporary git repo (with the project's Makefile and scripts/check-remote.py) is reproduced once; for each protocol
one clone runs `make push` (outputs and run-cache), a second clone runs `make pull` (both stages' run-cache entries
arrive) and there `dvc repro` runs nothing; a third clone pulls through the hosted workflow's own step scripts, with
the repository variables and secrets as environment variables. Credentials come from the environment only
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; SSH_AUTH_SOCK, an ssh-agent holding the key) and no config file holds
them. `make pull` and `make push` with a wrong key or an unreachable endpoint fail on one line that names the cause.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKFLOW = ROOT / ".github" / "workflows" / "pipeline.yml"
PIPELINE = """\
stages:
  gen:
    cmd: cat seed.txt seed.txt > a.txt
    deps: [seed.txt]
    outs: [a.txt]
  up:
    cmd: tr a-z A-Z < a.txt > b.txt
    deps: [a.txt]
    outs: [b.txt]
"""


@dataclass
class Remote:
    name: str  # the protocol
    options: dict[str, str]  # the remote's section of .dvc/config (url and the like: nothing secret)
    env: dict[str, str]  # the credentials, exported as a team (or CI's secrets) would
    wrong_key: dict[str, str]  # the same variables holding a key the server refuses
    unreachable: dict[str, str]  # options that point at a port nobody listens on
    ci_secrets: dict[str, str]  # the repository secrets the hosted workflow's pull and push steps read
    secrets: list[str] = field(default_factory=list)  # what no config file may contain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environ(**extra: str) -> dict[str, str]:
    """This process's environment without any credential of the machine's, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "SSH_AUTH_SOCK"}
    env.update(
        DVC_NO_ANALYTICS="1",
        AWS_EC2_METADATA_DISABLED="true",  # no key from an instance role (a key in the environment beats ~/.aws)
        AWS_DEFAULT_REGION="us-east-1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    env.update(extra)
    return env


def run(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # stdin closed: dvc-ssh asks for a password on a terminal, and a test must fail rather than wait for one
    return subprocess.run(
        cmd, cwd=cwd, env=env or environ(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return ok(run(str(BIN / "dvc"), *args, cwd=cwd, env=env))


def make(target: str, repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The project's `make pull` / `make push`, in repo, with this venv; -o setup: it is installed already."""
    return run("make", "-s", "-o", "setup", target, f"VENV={BIN.parent}", cwd=repo, env=env)


def use_remote(repo: Path, options: dict[str, str]) -> None:
    """What `dvc remote add -d team URL` and `dvc remote modify team KEY VALUE` write."""
    lines = ["[core]", "    remote = team", "['remote \"team\"']"] + [f"    {k} = {v}" for k, v in options.items()]
    (repo / ".dvc" / "config").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A git + DVC repo whose two stages ran (outputs and run-cache in its cache), committed; copy it to change it."""
    repo = tmp_path_factory.mktemp("pipeline")
    ok(run("git", "init", "-q", cwd=repo))
    dvc("init", "-q", cwd=repo)
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "seed.txt").write_text("hello\n")
    for name in ("Makefile", "pyproject.toml", "scripts/setup.sh", "scripts/check-remote.py"):
        (repo / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    dvc("repro", "-q", cwd=repo)
    ok(run("git", "add", "-A", cwd=repo))
    ok(run("git", "commit", "-qm", "pipeline", cwd=repo))
    return repo


@pytest.fixture(scope="module")
def s3():
    """A bucket on moto's S3 server, and the key of an IAM user allowed s3:*; every later request must be signed."""
    pytest.importorskip("dvc_s3", reason="dvc-s3 is in the remote extra (make setup installs the dev extra)")
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra (make setup)")
    from moto import settings

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="ci")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="ci", PolicyName="cache", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="ci")["AccessKey"]
    boto3.client("s3", **admin).create_bucket(Bucket="selfalign-cache")
    # From here on moto checks every request's signature against the keys of its IAM users.
    urllib.request.urlopen(
        urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
    ).close()
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    yield Remote(
        name="s3",
        options={"url": "s3://selfalign-cache/selfalign", "endpointurl": endpoint},
        env=env,
        wrong_key=env | {"AWS_SECRET_ACCESS_KEY": "not-" + key["SecretAccessKey"]},
        unreachable={"url": "s3://selfalign-cache/selfalign", "endpointurl": f"http://127.0.0.1:{free_port()}"},
        ci_secrets=env,
        secrets=[key["AccessKeyId"], key["SecretAccessKey"]],
    )
    server.stop()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # moto's default, for whatever else runs in this process


def start(cmd: list[str], log: Path, ready, what: str) -> subprocess.Popen:
    """Start a daemon in the foreground; skip, with its last words, when it is not ready in 10 s."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready():
        proc.kill()
        proc.wait()
        words = log.read_text().strip().splitlines()
        pytest.skip(f"{what} cannot be started here: {words[-1] if words else 'no output'}")
    return proc


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def ssh(tmp_path_factory):
    """OpenSSH's sshd on 127.0.0.1 (public keys only, SFTP), and two ssh-agents: one with its key, one with another."""
    pytest.importorskip("dvc_ssh", reason="dvc-ssh is in the remote extra (make setup installs the dev extra)")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"  # Debian's openssh-server puts it off a user's PATH
    if not Path(sshd).exists():
        pytest.skip("sshd is not installed: apt-get install -y openssh-server (.ci/run installs it)")
    for tool in ("ssh-keygen", "ssh-agent", "ssh-add"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (openssh-client)")
    d = tmp_path_factory.mktemp("ssh")
    for name in ("host", "id", "wrong"):
        ok(run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name), cwd=d))
    shutil.copy(d / "id.pub", d / "authorized_keys")
    if os.geteuid() == 0:  # root's sshd wants its privilege separation directory (systemd makes it at boot)
        Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nSubsystem sftp internal-sftp\n"
    )
    procs = [start([sshd, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log", lambda: listening(port), "sshd")]
    for name in ("id", "wrong"):
        sock = d / f"{name}.sock"
        procs.append(start(["ssh-agent", "-D", "-a", str(sock)], d / f"{name}-agent.log", sock.exists, "ssh-agent"))
        ok(run("ssh-add", "-q", str(d / name), cwd=d, env=environ(SSH_AUTH_SOCK=str(sock))))
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{port}{d}/remote"
    yield Remote(
        name="ssh",
        options={"url": url},
        env={"SSH_AUTH_SOCK": str(d / "id.sock")},
        wrong_key={"SSH_AUTH_SOCK": str(d / "wrong.sock")},
        unreachable={"url": url.replace(f":{port}/", f":{free_port()}/")},
        ci_secrets={"DVC_SSH_KEY": (d / "id").read_text()},
        secrets=["PRIVATE KEY", str(d / "id")],
    )
    for proc in procs:
        proc.terminate()
        proc.wait()


@pytest.fixture(params=["s3", "ssh"])
def remote(request) -> Remote:
    return request.getfixturevalue(request.param)


def test_a_second_clone_pulls_outputs_and_run_cache_and_reproduces_nothing(remote, pipeline, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(pipeline, first, symlinks=True)
    use_remote(first, remote.options)
    ok(run("git", "commit", "-qam", "the team's remote", cwd=first))
    env = environ(**remote.env)

    push = ok(make("push", first, env))
    assert "holds nothing yet" in push.stdout, push.stdout  # the first push: check-remote tolerates an empty root

    ok(run("git", "clone", "-q", str(first), str(second), cwd=tmp_path))
    assert not (second / "b.txt").exists()
    pull = ok(make("pull", second, env))
    assert "answers" in pull.stdout and "nothing" not in pull.stdout, pull.stdout
    assert (second / "b.txt").read_text() == "HELLO\nHELLO\n"
    # The run-cache came too: one entry per stage (with it, `dvc repro` restores a stage whose dvc.lock entry is
    # gone, or that another branch ran, instead of running it).
    assert len([p for p in (second / ".dvc" / "cache" / "runs").rglob("*") if p.is_file()]) == 2
    repro = dvc("repro", cwd=second, env=env)
    assert "Running stage" not in repro.stdout and "up to date" in repro.stdout, repro.stdout

    configs = [p for repo in (first, second) for p in (repo / ".dvc").glob("config*")]
    configs += workflow_pull(remote, pipeline, tmp_path / "ci")
    for secret in remote.secrets:
        assert not [p for p in configs if secret in p.read_text()], f"a config file holds {secret!r}"


def step(name: str) -> dict:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["reproduce"]["steps"]
    return next(s for s in steps if s.get("name", "").startswith(name))


def workflow_pull(remote: Remote, pipeline: Path, ci: Path) -> list[Path]:
    """The hosted workflow's own steps, as its run: scripts, in a clone that names no remote: the variables
    DVC_REMOTE_URL (and DVC_REMOTE_ENDPOINT) pick the remote, the secrets reach the pull step as variables (an SSH
    key as DVC_SSH_KEY, which the step loads into an ssh-agent of its own). Returns the config files it wrote."""
    ok(run("git", "clone", "-q", str(pipeline), str(ci), cwd=ci.parent))
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    variables = {"DVC_REMOTE_URL": remote.options["url"], "DVC_REMOTE_ENDPOINT": remote.options.get("endpointurl", "")}
    for name, env in (("Use the team's remote", variables), ("Pull what the remote has", remote.ci_secrets)):
        ok(run("bash", "-e", "-c", step(name)["run"], cwd=ci, env=environ(PATH=path, **env)))
    assert (ci / "b.txt").read_text() == "HELLO\nHELLO\n"
    return list((ci / ".dvc").glob("config*"))


CAUSES = {  # what check-remote's one line names, per protocol and case
    ("s3", "wrong_key"): "PermissionError: The request signature we calculated does not match",
    ("s3", "unreachable"): "EndpointConnectionError: Could not connect to the endpoint URL",
    ("ssh", "wrong_key"): "PermissionError: Permission denied",
    ("ssh", "unreachable"): "ConnectionRefusedError",
}


# push runs the same check as pull (the Makefile's two lines): once per protocol is enough to keep it there
@pytest.mark.parametrize(("case", "target"), [("wrong_key", "pull"), ("unreachable", "pull"), ("wrong_key", "push")])
def test_a_wrong_key_or_an_unreachable_endpoint_fails_make_on_one_line(remote, case, target, pipeline, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline, repo, symlinks=True)
    use_remote(repo, remote.unreachable if case == "unreachable" else remote.options)
    # AWS_MAX_ATTEMPTS=1: botocore retries a refused connection for ~12 s before it gives up
    env = environ(**(remote.wrong_key if case == "wrong_key" else remote.env), AWS_MAX_ATTEMPTS="1")
    proc = make(target, repo, env)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    # make's own "make: ***" line (or "make[1]: ***" when the tests themselves run under make test)
    lines = [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1 and "cannot be read" in lines[0], proc.stderr
    assert CAUSES[(remote.name, case)] in lines[0], lines[0]


def test_a_misspelt_bucket_fails_rather_than_passing_for_an_empty_remote(s3, pipeline, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline, repo, symlinks=True)
    use_remote(repo, s3.options | {"url": "s3://selfalign-cahce/selfalign"})
    proc = make("pull", repo, environ(**s3.env))
    assert proc.returncode != 0 and "the bucket does not exist" in proc.stderr, proc.stdout + proc.stderr
