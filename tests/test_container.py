"""The container image is real: built with the README's `podman build` line, run with its `podman run` line
against the test stack, replicating a collection, as a non-root user, its sqlite store on the volume, stopped
cleanly by `podman stop`.

No registry is reachable here, so the README's build line is the one for a local Debian base; that base is made
here once per machine and kept (`podman image exists`): `debootstrap --variant=minbase` from the mirror apt uses,
`podman import`, then Debian's python3 on it. Needs podman, runc and debootstrap (`.ci/run` installs them); the
test is skipped without podman, except under CI, where it fails.
"""
from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pymilvus import DataType, MilvusClient

from helpers import ROOT, CdcServer, assert_same_rows, client, load_state_of, server_config, wait_until
from stack import CACHE_ROOT, cache_lock

SUITE = "bookworm"
ROOTFS_IMAGE = f"localhost/debian-base:{SUITE}"  # debootstrap's root file system, imported
PYTHON_PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates"]
VOLUME_PATH = "/app/data"  # the image's working directory and volume
CONFIG_PATH = "/app/config.yaml"


def readme_podman_lines() -> tuple[list[str], list[str]]:
    """The README's `podman build` line for a local base (`--build-arg BASE=...`) and its `podman run` line,
    split as a shell would, from the bash blocks of its "Container image" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Container image\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["podman"]:
                lines.append(words)
    builds = [w for w in lines if w[1] == "build" and any(a.startswith("BASE=") for a in w)]
    runs = [w for w in lines if w[1] == "run"]
    assert len(builds) == 1 and len(runs) == 1, f"the README's podman lines: {lines}"
    return builds[0], runs[0]


def option(words: list[str], name: str) -> list[str]:
    """Every value of an option given as `name value`."""
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == name]


def adapted_run_line(run: list[str], config: Path, name: str, volume: str) -> list[str]:
    """The README's run line with the test's config file and the host's network instead of the published port
    (the stack listens on loopback), and a container and volume name of its own."""
    assert option(run, "-p") and option(run, "--name") and "-d" in run, run
    mounts = {value.split(":")[1]: value for value in option(run, "-v")}
    assert set(mounts) == {CONFIG_PATH, VOLUME_PATH}, run
    out, i = [], 0
    while i < len(run):
        word = run[i]
        if word == "-p":
            out += ["--network", "host"]
        elif word == "--name":
            out += [word, name]
        elif word == "-v":
            target = run[i + 1].split(":", 1)[1]
            out += [word, f"{config if target.startswith(CONFIG_PATH) else volume}:{target}"]
        else:
            out.append(word)
            i += 1
            continue
        i += 2
    return out


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror apt uses on this machine for `suite` (one-line or deb822 sources)."""
    sources_d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(sources_d.glob("*.list")), *sorted(sources_d.glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ", "\t")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.split()
                if ("deb" in fields.get("types", []) and suite in fields.get("suites", []) and fields.get("uris")
                        and fields.get("enabled", ["yes"])[0].lower() != "no"):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    return "http://deb.debian.org/debian"


def require(found, what: str):
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{what} (.ci/run installs it)")
        pytest.skip(what)
    return found


class Podman:
    """`podman` with this machine's quirks in a containers.conf of the test's own (CONTAINERS_CONF): `runc`
    (crun refuses to start containers here) and rlimits no higher than the host's (they cannot be raised)."""

    def __init__(self, workdir: Path):
        self.env = dict(os.environ)
        if "CONTAINERS_CONF" not in self.env:
            ulimits = []
            for name, limit, wanted in (("nofile", resource.RLIMIT_NOFILE, 20000),
                                        ("nproc", resource.RLIMIT_NPROC, 32768)):
                hard = resource.getrlimit(limit)[1]
                value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
                ulimits.append(f'"{name}={value}:{value}"')
            conf = workdir / "containers.conf"
            runc = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin")
            runtime = '[engine]\nruntime = "runc"\n' if runc else ""
            conf.write_text(f"[containers]\ndefault_ulimits = [{', '.join(ulimits)}]\n{runtime}")
            self.env["CONTAINERS_CONF"] = str(conf)

    def __call__(self, *args, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], check=False, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check:
            assert done.returncode == 0, f"podman {shlex.join(args)}: exit {done.returncode}\n" \
                                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def image_exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0


def ensure_debian_python_base(podman: Podman, image: str, timings: dict) -> None:
    """`image` (the README's BASE): Debian's python3 on a debootstrap'd bookworm, made once per machine."""
    if podman.image_exists(image):
        return
    with cache_lock("container-base"):
        if podman.image_exists(image):
            return
        if not podman.image_exists(ROOTFS_IMAGE):
            debootstrap = require(shutil.which("debootstrap", path="/usr/sbin:/usr/bin:/sbin:/bin"),
                                  "debootstrap is not installed (apt-get install debootstrap)")
            require(os.geteuid() == 0, "making the Debian base image needs root (debootstrap)")
            scratch = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_ROOT))  # kept out of the repository
            try:
                started = time.monotonic()
                rootfs = scratch / "rootfs"
                done = subprocess.run([debootstrap, "--variant=minbase", SUITE, str(rootfs), apt_mirror()],
                                      check=False, capture_output=True, text=True, timeout=900)
                assert done.returncode == 0, f"debootstrap: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                timings["debootstrap"] = time.monotonic() - started
                started = time.monotonic()
                tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
                podman("import", "-", ROOTFS_IMAGE, stdin=tar.stdout, timeout=300)
                tar.stdout.close()
                assert tar.wait() == 0, "tar of the root file system failed"
                timings["import"] = time.monotonic() - started
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as context:
            (Path(context) / "Containerfile").write_text(
                f"FROM {ROOTFS_IMAGE}\n"
                "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                f"{' '.join(PYTHON_PACKAGES)} && rm -rf /var/lib/apt/lists/*\n")
            podman("build", "-f", str(Path(context) / "Containerfile"), "-t", image, context, timeout=900)
        timings["python base"] = time.monotonic() - started


def sample_schema():
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("s", DataType.VARCHAR, max_length=64)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    return schema


def sample_rows(start: int, count: int) -> list[dict]:
    return [{"id": i, "s": f"row-{i}", "v": [i / 7, 1.0, -i / 3, 0.5], "extra": i % 5}
            for i in range(start, start + count)]


def test_the_readme_image_replicates_as_a_non_root_user_and_stops_on_sigterm(stack, unique_name, tmp_path):
    require(shutil.which("podman"), "podman is not installed (apt-get install podman runc)")
    podman = Podman(tmp_path)
    build, run = readme_podman_lines()
    base = next(a.split("=", 1)[1] for a in option(build, "--build-arg") if a.startswith("BASE="))
    image = option(build, "-t")[0]
    assert run[-1] == image, "the README runs the image it builds"
    timings: dict[str, float] = {}

    ensure_debian_python_base(podman, base, timings)
    started = time.monotonic()
    podman(*build[1:], cwd=ROOT, timeout=1200)  # exactly the README's line
    timings["image build"] = time.monotonic() - started

    config = server_config(stack, Path(VOLUME_PATH))  # sqlite store: /app/data/meta.db, on the volume
    server = CdcServer(config, tmp_path)  # only writes the config and talks to the container's port
    server.config_path.chmod(0o644)  # read by uid 10001 in the container
    name = unique_name("milvus-cdc-test")
    volume = f"{name}-data"

    def logs() -> str:
        done = podman("logs", name, check=False)
        return (done.stdout + done.stderr)[-3000:]

    def serving() -> None:
        wait_until(lambda: server.post({"request_type": "list"})[0] == 200, 60,
                   what=f"the container's server on {server.url}, log:\n{logs()}")

    collection = unique_name("container")
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    try:
        started = time.monotonic()
        podman(*adapted_run_line(run, server.config_path, name, volume)[1:])
        serving()
        timings["start"] = time.monotonic() - started

        uid = podman("exec", name, "id", "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, f"the server runs as uid {uid}"
        assert podman("inspect", name, "--format", "{{.Config.User}}").stdout.strip().split(":")[0] == uid

        task_id = server.create_task(stack["target_milvus"], collections=[collection])
        source.create_collection(collection, schema=sample_schema(), shards_num=2, consistency_level="Strong")
        params = source.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        source.create_index(collection, params)
        source.load_collection(collection)
        source.insert(collection, sample_rows(0, 200))
        wait_until(lambda: target.has_collection(collection) and load_state_of(target, collection) == "Loaded", 90,
                   what=f"{collection} to be created and loaded on the target, log:\n{logs()}")
        assert_same_rows(source, target, collection, ["id", "s", "v", "extra"])

        mountpoint = Path(podman("volume", "inspect", volume, "--format", "{{.Mountpoint}}").stdout.strip())
        store = mountpoint / Path(config["metaStoreConfig"]["sqlitePath"]).name
        assert store.is_file(), f"no sqlite store on the volume: {sorted(os.listdir(mountpoint))}"
        assert store.stat().st_uid == int(uid)

        started = time.monotonic()
        podman("stop", "-t", "30", name, timeout=60)
        timings["podman stop"] = stopped = time.monotonic() - started
        state = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert stopped < 10 and state == "0", f"podman stop took {stopped:.1f}s, exit code {state}:\n{logs()}"
        assert "shutting down" in logs()

        # The task comes back from the store on the volume, and goes on.
        podman("start", name)
        serving()
        assert server.task(task_id)["state"] == "Running"
        source.insert(collection, sample_rows(200, 100))
        assert_same_rows(source, target, collection, ["id", "s", "v", "extra"])

        source.drop_collection(collection)
        wait_until(lambda: not target.has_collection(collection), 60, what=f"{collection} dropped on the target")
        server.call("delete", task_id=task_id)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        podman("volume", "rm", "--force", volume, check=False)
        if source.has_collection(collection):
            source.drop_collection(collection)
        print("container test timings (s):", {k: round(v, 1) for k, v in timings.items()})
