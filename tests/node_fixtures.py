"""A real `stoke node` agent process for tests, and a client for it."""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.auth import TlsFiles

SECRET = "node-test-secret"
START_TIMEOUT_S = 60.0


@dataclass
class AgentProcess:
    """A running agent: `address` is its NodeAgent service (host:port)."""

    proc: subprocess.Popen[str]
    address: str
    dram_dir: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for a clean exit; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_agent(tmp: Path, *extra: str) -> AgentProcess:
    """Start `python -m stoke.cli node` on a free loopback port under `tmp`; wait until it
    prints its address (or fail with its exit status)."""
    node_id = f"t-{uuid.uuid4().hex[:10]}"
    dram = tmp / "dram"
    cmd = [
        sys.executable, "-m", "stoke.cli", "node", "--listen", "127.0.0.1:0",
        "--home", str(tmp / "home"), "--node-id", node_id, "--dram-dir", str(dram),
        "--dram-cache", "64MiB", "--disk-cache", "64MiB", "--secret", SECRET, *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"agent did not start in {START_TIMEOUT_S} s") from None
    assert first.startswith("listening on "), f"unexpected first line {first!r}"
    return AgentProcess(proc, first.removeprefix("listening on "), dram, lines)


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists (and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def proc_environ(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with (as the kernel keeps it)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def proc_argv(pid: int) -> list[str]:
    """The command line of process `pid`."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def self_signed_cert(tmp_path: Path) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stoke-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
