"""Build the example image secretd-example:latest (`make image`; contract §9).

Stages a Docker build context from nothing but Debian packages and this project, then runs
`docker build` with deploy/Dockerfile:

1. rootfs.tar — `mmdebstrap --variant=extract` of the Python 3.11 interpreter and standard
   library from the apt sources this machine is configured with, minus the package manager
   and archiver its dependencies drag in. Cached under ``$XDG_CACHE_HOME/secretd/image`` (or
   ``~/.cache``), keyed by the package list, the apt sources and this recipe: a cache hit
   saves ≈ 20 s and a download of ≈ 15 MB. ``--refresh-rootfs`` rebuilds it (security updates).
2. usr/lib/python3/dist-packages — the client from client-py/src plus grpcio and protobuf at
   the versions pinned in requirements.txt (the client's run-time pins), as manylinux cp311
   wheels (`pip --target` with the host's pip; the image's Python is 3.11, so the ABI matches).
3. usr/bin — the static `secretd` and `secretd-shim` from ``--bin-dir``.
4. etc (passwd, group, /etc/secretd) and app/function.py from deploy/image.

Every staged file is root-owned, 0644 (0755 for programs and directories): the broker and the
shim refuse config files that are not root-owned or are group/other-writable.

The engine is whatever ``DOCKER_HOST`` names (default: the local socket); the client is
``/usr/bin/docker`` (Debian's; it builds without buildx), or ``--docker``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_TAG = "secretd-example:latest"
SUITE = "bookworm"
# libstdc++6: grpcio's extension module links it (manylinux allows it as a system library).
PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]
# Files that dependencies bring but that the image must not have: no package manager, no
# archiver, no daemon tools (nothing in the closure is a shell or coreutils; the test checks).
REMOVE = [
    "bin/tar",
    "usr/bin/dpkg*",
    "usr/bin/update-alternatives",
    "usr/sbin/*",
    "sbin/start-stop-daemon",
    "etc/apt",
    "etc/dpkg",
    "etc/alternatives",
    "etc/cron.daily",
    "etc/logrotate.d",
    "etc/rmt",
    "var/lib/apt",
    "var/lib/dpkg",
    "var/cache/apt",
    "var/cache/debconf",
    "var/log/*",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
]
# Run on the build host after extraction (the only hooks the extract variant runs), never in
# the image: it has no shell. REMOVE is applied afterwards, to the finished tree (mmdebstrap's
# own clean-up still needs apt's and dpkg's files).
HOOKS = [
    # Byte-compile the standard library with the image's own interpreter: the function runs as
    # an unprivileged user that could not write the cache, and would recompile on every start.
    'chroot "$1" /usr/bin/python3.11 -I -m compileall -q /usr/lib/python3.11 >/dev/null',
    'mkdir -p -m 0755 "$1"/run "$1"/app',
    'mkdir -p -m 1777 "$1"/tmp',
]
# A recipe change must invalidate the cache: bump with any change to the mmdebstrap call.
RECIPE = "4"


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def apt_sources() -> list[Path]:
    """The machine's apt sources (one-line and deb822 files), as mmdebstrap takes them."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return [
        f
        for f in files
        if f.is_file() and f.suffix in (".list", ".sources") and f.read_text().strip()
    ]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "secretd" / "image"


def rootfs(refresh: bool) -> Path:
    sources = apt_sources()
    if not sources:
        raise SystemExit("image: no apt sources in /etc/apt (sources.list or sources.list.d)")
    key = hashlib.sha256()
    for part in [RECIPE, SUITE, *PACKAGES, *HOOKS, *REMOVE]:
        key.update(part.encode() + b"\0")
    for source in sources:
        key.update(source.read_bytes())
    tarball = cache_dir() / f"rootfs-{key.hexdigest()[:16]}.tar"
    if tarball.exists() and not refresh:
        log(f"rootfs: cached {tarball}")
        return tarball
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise SystemExit("image: mmdebstrap is not installed (apt-get install mmdebstrap)")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
        tree = Path(tmp) / "rootfs"
        partial = Path(tmp) / "rootfs.tar"
        subprocess.run(
            [
                mmdebstrap,
                "--quiet",
                "--variant=extract",
                "--include=" + ",".join(PACKAGES),
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                *(f"--extract-hook={hook}" for hook in HOOKS),
                SUITE,
                str(tree),
                *(str(s) for s in sources),
            ],
            check=True,
        )
        for pattern in REMOVE:
            for path in tree.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        subprocess.run(
            ["tar", "--numeric-owner", "--sort=name", "-C", str(tree), "-cf", str(partial), "."],
            check=True,
        )
        partial.rename(tarball)
    for old in tarball.parent.glob("rootfs-*.tar"):
        if old != tarball:
            old.unlink()
    log(f"rootfs: built {tarball} in {time.monotonic() - started:.0f} s")
    return tarball


def pinned(package: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip() == package:
            return line.strip()
    raise SystemExit(f"image: {package} is not pinned in requirements.txt")


def site_packages(target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
            str(target),
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--only-binary=:all:",
            pinned("grpcio"),
            pinned("protobuf"),
        ],
        check=True,
    )
    shutil.copytree(
        REPO / "client-py" / "src" / "secretd",
        target / "secretd",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for junk in target.glob("*.dist-info"):
        shutil.rmtree(junk)
    shutil.rmtree(target / "bin", ignore_errors=True)
    # Same bytecode magic as the image's 3.11; stale caches are only recompiled in memory.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", str(target)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def install(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def normalize(root: Path) -> None:
    """Root-owned; directories 0755, files 0644, programs 0755 (what the trust checks want)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chown(dirpath, 0, 0)
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            os.chown(path, 0, 0)
            path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


def stage(context: Path, bin_dir: Path, refresh: bool) -> None:
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    tarball = rootfs(refresh)
    # A hard link when the cache is on the same file system: no 50 MB copy per build.
    try:
        os.link(tarball, context / "rootfs.tar")
    except OSError:
        shutil.copyfile(tarball, context / "rootfs.tar")
    for binary in ("secretd", "secretd-shim"):
        if not (bin_dir / binary).is_file():
            raise SystemExit(f"image: {bin_dir / binary} is missing (run `make build` first)")
        install(bin_dir / binary, context / "usr" / "bin" / binary, 0o755)
    site_packages(context / "usr" / "lib" / "python3" / "dist-packages")
    install(HERE / "passwd", context / "etc" / "passwd", 0o644)
    install(HERE / "group", context / "etc" / "group", 0o644)
    install(HERE / "secretd.toml", context / "etc" / "secretd" / "secretd.toml", 0o644)
    install(HERE / "shim.toml", context / "etc" / "secretd" / "shim.toml", 0o644)
    install(HERE / "function.py", context / "app" / "function.py", 0o644)
    for sub in ("usr", "etc", "app"):
        normalize(context / sub)
    shutil.copyfile(REPO / "deploy" / "Dockerfile", context / "Dockerfile")


def build(context: Path, tag: str, docker: str) -> None:
    env = dict(os.environ)
    # The classic builder: Debian's docker.io client builds without buildx.
    env["DOCKER_BUILDKIT"] = "0"
    subprocess.run([docker, "build", "--quiet", "-t", tag, str(context)], check=True, env=env)
    size = subprocess.run(
        [docker, "image", "inspect", "-f", "{{.Size}}", tag],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    log(f"built {tag}: {int(size) / 1e6:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, required=True, help="where secretd{,-shim} are")
    parser.add_argument("--context", type=Path, default=REPO / "target" / "image")
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--docker", default="/usr/bin/docker")
    parser.add_argument("--refresh-rootfs", action="store_true", help="ignore the cached rootfs")
    parser.add_argument("--stage-only", action="store_true", help="stage the context, no build")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("image: run as root (mmdebstrap and root-owned files in the context)")
    started = time.monotonic()
    stage(args.context, args.bin_dir, args.refresh_rootfs)
    log(f"context staged in {args.context} ({time.monotonic() - started:.0f} s)")
    if not args.stage_only:
        build(args.context, args.tag, args.docker)
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
