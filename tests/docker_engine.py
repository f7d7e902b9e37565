"""A private Docker engine for the container tests, and a local stand-in base image.

`DockerEngine` starts Debian's `dockerd` with its data root, exec root and socket under
one folder in /tmp. It adds no iptables rules and no default bridge, so it changes
nothing in the host's firewall or network. Builds and containers therefore need
`--network host` (CLEAR_DOCKER_NETWORK=host for the docker runtime). The
data root is kept between runs, so built layers are reused. The engine itself is
always stopped, and one left running by a killed test run is stopped at the next start.

No registry is reachable from CI, so `ensure_base_image` builds the image that every
Dockerfile starts from, `python:3.11-slim-bookworm`, from Debian packages. debootstrap
writes a minimal bookworm root with Python 3.11, pip, venv and the host's CA
certificates, and `docker import` turns it into an image. The root is cached as a
tarball under ~/.cache/clear-pipeline, keyed by the recipe and the host's certificates.

From a shell, with the engine's address in DOCKER_HOST for the command:

    python tests/docker_engine.py run -- docker info
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("CLEAR_DOCKER_ROOT", "/tmp/clear-pipeline-docker"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clear-pipeline"
BASE_IMAGE = "python:3.11-slim-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("docker.io", "debootstrap", "docker-compose")
# Debian's client matches Debian's engine; a newer client elsewhere on PATH may not.
DOCKER = "/usr/bin/docker"
HOST_CERTIFICATES = Path("/usr/local/share/ca-certificates")
# Debian bookworm's python3 is 3.11.2. The official image has a later 3.11 release, so
# the lock files must also install on 3.11.2.
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
    "LABEL org.opencontainers.image.description="
    "local-stand-in-for-python:3.11-slim-bookworm,built-by-debootstrap",
)
# Run inside the new root: `python` and `pip` on PATH as in the official image, the
# host's certificates trusted, and no package caches or documentation.
BASE_SETUP = """
set -e
ln -sf /usr/bin/python3 /usr/local/bin/python
printf '#!/bin/sh\\nexec /usr/bin/python3 -m pip "$@"\\n' > /usr/local/bin/pip
chmod 755 /usr/local/bin/pip
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
update-ca-certificates > /dev/null
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
    /usr/share/locale/* /var/log/*.log
"""


class EngineError(RuntimeError):
    pass


def missing_packages() -> list[str]:
    """Return the packages of DEBIAN_PACKAGES that are not installed."""
    missing = []
    for package in DEBIAN_PACKAGES:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True)
        if "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


def in_ci() -> bool:
    """Return whether the CI variable is set to a true value (CI=true in CI runs)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def install_packages() -> None:
    """Install the engine, debootstrap and docker-compose from Debian when missing."""
    if shutil.which("dpkg-query") is None:
        raise EngineError("the container tests need a Debian host (dpkg-query not found)")
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise EngineError(f"Debian packages {', '.join(missing)} are missing; install them "
                          f"with: sudo apt-get install {' '.join(missing)}")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=environment, stdout=subprocess.DEVNULL)


def install_packages_or_skip(purpose: str) -> None:
    """Install the Debian packages, or skip the calling test where that is impossible.

    Under CI the test fails instead, because CI must run the container tests.
    """
    import pytest

    try:
        install_packages()
    except EngineError as error:
        if in_ci():
            pytest.fail(f"{purpose} cannot run: {error}")
        pytest.skip(f"{purpose} skipped: {error}")


class DockerEngine:
    """`dockerd` on a Unix socket under `root`; use as a context manager."""

    def __init__(self, root: Path = ROOT, start_timeout: float = 60.0):
        self.root = Path(root)
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self._lock = None

    def environment(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run the Docker client against this engine."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        result = subprocess.run([DOCKER, *args], env=self.environment(), **kwargs)
        if check and result.returncode != 0:
            raise EngineError(f"docker {' '.join(args)} failed with status "
                              f"{result.returncode}: {(result.stderr or '')[-2000:]}")
        return result

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # One engine per data root: a second test run waits instead of sharing it.
        self._lock = open(self.root / "engine.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"another run holds the Docker engine on {self.root}; waiting "
                             "for it to stop (set CLEAR_DOCKER_ROOT to use another root)\n")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._stop_orphan()
        self.socket.unlink(missing_ok=True)

        self.log_path = self.root / "dockerd.log"
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--host", self.host, "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=overlay2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise EngineError(f"dockerd exited with status {self.process.returncode}; "
                                  f"see {self.log_path}")
            if self.socket.exists() and self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        raise EngineError(f"dockerd did not answer on {self.host} within "
                          f"{self.start_timeout:.0f} s; see {self.log_path}")

    def _stop_orphan(self) -> None:
        """Stop a dockerd on this root left by a test run that died before stopping it.

        The caller holds the root's lock, so no live run owns that engine.
        """
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int((self.root / "docker.pid").read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not command or Path(command[0].decode()).name != "dockerd" \
                    or str(self.root).encode() not in b" ".join(command):
                return
            os.kill(pid, signal.SIGTERM)
            for _ in range(300):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the engine and the containerd it started, by their PIDs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        containerd_pid = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(containerd_pid.read_text().strip()), signal.SIGKILL)
        # dockerd keeps its network namespace mounted after exit, and a killed dockerd
        # also leaves its data root bind-mounted on itself.
        for mount in (self.root / "exec" / "netns" / "default", self.root / "data"):
            if _mount_point(mount):
                subprocess.run(["umount", str(mount)], check=False)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> DockerEngine:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def remove_containers(self, name_prefix: str) -> list[str]:
        """Force-remove every container whose name starts with `name_prefix`."""
        listed = self.docker("ps", "--all", "--format", "{{.Names}}").stdout.split()
        names = [name for name in listed if name.startswith(name_prefix)]
        if names:
            self.docker("rm", "--force", *names, check=False)
        return names


def _mount_point(path: Path) -> bool:
    """Return whether `path` is a mount point, a bind mount on the same file system included.

    os.path.ismount compares devices, so it misses such a bind mount.
    NOTE: mountinfo escapes spaces in paths as \\040; a root with spaces is not matched.
    """
    mount_points = {line.split()[4] for line in
                    Path("/proc/self/mountinfo").read_text().splitlines()}
    return str(path) in mount_points


def _base_key() -> str:
    digest = hashlib.sha256((BASE_PACKAGES + BASE_SETUP + "".join(BASE_CHANGES)).encode())
    for certificate in sorted(HOST_CERTIFICATES.glob("*.crt")):
        digest.update(certificate.read_bytes())
    return digest.hexdigest()[:16]


def base_tarball() -> Path:
    """The cached root of the base image, built with debootstrap when missing."""
    tarball = CACHE / f"python-3.11-slim-bookworm-{_base_key()}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise EngineError("debootstrap is missing; install it with: apt-get install debootstrap")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="clear-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                        "bookworm", str(rootfs), DEBIAN_MIRROR],
                       check=True, stdout=subprocess.DEVNULL)
        target = rootfs / "usr/local/share/ca-certificates"
        target.mkdir(parents=True, exist_ok=True)
        for certificate in HOST_CERTIFICATES.glob("*.crt"):
            shutil.copy(certificate, target / certificate.name)
        subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", BASE_SETUP], check=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                       check=True)
        partial.rename(tarball)
    return tarball


def ensure_base_image(engine: DockerEngine) -> str:
    """Import the stand-in `python:3.11-slim-bookworm` into `engine` unless present."""
    key = _base_key()
    current = engine.docker("image", "inspect", "--format",
                            '{{ index .Config.Labels "clear-pipeline.base-key" }}',
                            BASE_IMAGE, check=False)
    if current.returncode == 0 and current.stdout.strip() == key:
        return BASE_IMAGE
    changes = [*BASE_CHANGES, f"LABEL clear-pipeline.base-key={key}"]
    arguments = [argument for change in changes for argument in ("--change", change)]
    engine.docker("import", *arguments, str(base_tarball()), BASE_IMAGE)
    return BASE_IMAGE


def build_image(engine: DockerEngine, image: str, tag: str, context: Path) -> None:
    """Build images/<image>/Dockerfile from the repository root `context` as `tag`.

    The build's output goes to this process's stdout, so the CI log shows it. Builds
    use the host network because the engine has no bridge.
    """
    dockerfile = Path(context) / "images" / image / "Dockerfile"
    command = [DOCKER, "build", "--network", "host", "--file", str(dockerfile), "--tag", tag,
               str(context)]
    result = subprocess.run(command, env=engine.environment(), stdout=sys.stdout,
                            stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise EngineError(f"building {tag} from {dockerfile} failed with status "
                          f"{result.returncode}")


@contextlib.contextmanager
def uncaptured(request):
    """Let output through to the CI log for a module fixture, as `capsys.disabled()` does."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        yield


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "run" or argv[1] != "--":
        sys.stderr.write(__doc__)
        return 2
    install_packages()
    # SIGTERM (a cancelled CI job, `timeout`) must stop the engine as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with DockerEngine() as engine:
        ensure_base_image(engine)
        return subprocess.run(argv[2:], env=engine.environment()).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
