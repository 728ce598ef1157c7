"""A real tritonserver loads a `sed-export triton --platform python` repository and serves the `sed` ensemble,
the encoder and the text encoder with the bundle's own numbers (issue 16).

The server is the one inside PyTriton's wheel (Triton 2.51 with only the Python backend), downloaded from PyPI
into a cache and run as it is; the wheel is never installed, because it pins numpy < 2. Its Python-backend stub
runs this interpreter's environment (found through PATH, as PyTriton does), where numpy and onnxruntime are.
What this cannot test: the onnxruntime and tensorrt backends loading the `--platform onnxruntime|tensorrt`
repositories (the wheel has neither backend), and GPU instance groups.

The server binds HTTP and gRPC to 127.0.0.1 only, with metrics off; the test asserts that every socket it
listens on is a loopback one, and stops it at the end.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from needs import need

need("tritonclient")
ort = need("onnxruntime")

import tritonclient.grpc as grpcclient
from PIL import Image
from safetensors.numpy import load_file

from sed_runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"
PYTRITON = "nvidia-pytriton==0.7.0"  # Triton 2.51; its wheel is manylinux_2_35 x86_64
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sed-deploy" / "pytriton-0.7.0"
READY_SECONDS = 120


def _pytriton_tree() -> Path:
    """The unpacked wheel (cached), or a skip that says why there is none."""
    marker = CACHE / ".unpacked"
    if not marker.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE / "wheel"),
                            PYTRITON], capture_output=True, text=True, timeout=600)
        wheels = list((CACHE / "wheel").glob("nvidia_pytriton-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"could not download {PYTRITON} from PyPI for its tritonserver: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            for info in z.infolist():
                z.extract(info, CACHE / "tree")
                mode = info.external_attr >> 16
                if mode:
                    os.chmod(CACHE / "tree" / info.filename, mode & 0o777)
        marker.touch()
    return CACHE / "tree"


def _server_dir(tree: Path, tmp: Path) -> tuple[Path, dict[str, str]]:
    """Backends folder with the Python backend and the stub for this interpreter, and the server's environment."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tree / "pytriton" / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        pytest.skip(f"PyTriton 0.7 has no Python-backend stub for Python {version}")
    backends = tmp / "backends"
    (backends / "python").mkdir(parents=True)
    source = tree / "pytriton" / "tritonserver" / "backends" / "python"
    for f in source.iterdir():
        (backends / "python" / f.name).symlink_to(f)
    (backends / "python" / "triton_python_backend_stub").symlink_to(stub)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {**os.environ,
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the stub finds this environment's python3 here
           "LD_LIBRARY_PATH": ":".join(p for p in (str(tree / "nvidia_pytriton.libs"), libdir,
                                                     os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    missing = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    if "not found" in missing:
        pytest.skip(f"the Python-backend stub lacks libraries here: {missing.strip()}")
    return backends, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses of the TCP sockets process `pid` listens on (from /proc, no tools needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                hex_ip = cols[1].split(":")[0]
                if width == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]))
                else:
                    words = [bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[grpcclient.InferenceServerClient, subprocess.Popen]]:
    tree = _pytriton_tree()
    tmp = tmp_path_factory.mktemp("tritonserver")
    repo = tmp / "repo"
    r = subprocess.run([str(BIN / "sed-export"), "triton", str(DEMO_BUNDLE), "--out", str(repo), "--platform",
                        "python"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    backends, env = _server_dir(tree, tmp)
    http_port, grpc_port = _free_port(), _free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [str(tree / "pytriton" / "tritonserver" / "bin" / "tritonserver"), f"--model-repository={repo}",
         f"--backend-directory={backends}", "--http-address=127.0.0.1", f"--http-port={http_port}",
         "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}", "--allow-metrics=false"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                if client.is_model_ready("sed"):
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield client, proc
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _inputs(**arrays: np.ndarray) -> list[grpcclient.InferInput]:
    types = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    out = []
    for name, value in arrays.items():
        inp = grpcclient.InferInput(name, list(value.shape), types[value.dtype])
        inp.set_data_from_numpy(value)
        out.append(inp)
    return out


def test_the_server_listens_on_loopback_only(server) -> None:
    _, proc = server
    addresses = _listening_addresses(proc.pid)
    assert len(addresses) >= 1 and all(_is_loopback(a) for a in addresses), addresses


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1 for 127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_the_ensemble_returns_the_bundles_scores_and_kept_classes(server) -> None:
    client, _ = server
    bundle = Bundle.open(DEMO_BUNDLE)
    text = load_file(bundle.root / bundle.manifest["vocabulary"]["embeddings"])["embeddings"]
    image = bundle.input_spec.preprocess(np.asarray(Image.open(ROOT / "examples/images/shapes.jpg").convert("RGB")))
    encoder = ort.InferenceSession(str(bundle.path("encoder")), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(bundle.path("decoder")), providers=["CPUExecutionProvider"])
    feats = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, {"image": image.tensor})))
    for k in (8, 1):
        kk = np.array([k], np.int64)
        result = client.infer("sed", _inputs(image=image.tensor, text=text, k=kk))
        want = dict(zip([o.name for o in decoder.get_outputs()], decoder.run(None, {**feats, "text": text, "k": kk})))
        np.testing.assert_allclose(result.as_numpy("scores"), want["scores"], atol=1e-6)
        for name in ("kept0", "kept1", "kept2"):
            np.testing.assert_array_equal(result.as_numpy(name), want[name])
        assert len(want["kept2"]) < len(text)  # CER rejected classes: kept counts travel through the ensemble
        assert want["scores"].max() > 0.5  # the trained model finds something in the demo scene


def test_the_text_encoder_serves_variable_length_prompts(server) -> None:
    client, _ = server
    bundle = Bundle.open(DEMO_BUNDLE)
    session = ort.InferenceSession(str(bundle.path("text_encoder")), providers=["CPUExecutionProvider"])
    tokens = np.zeros((3, 9), np.int64)  # start, a few words, end (the argmax), padding
    tokens[:, 0] = 49406
    tokens[0, 1:4], tokens[0, 4] = [320, 1746, 2446], 49407
    tokens[1, 1:3], tokens[1, 3] = [1125, 8546], 49407
    tokens[2, 1:8], tokens[2, 8] = [320, 1125, 530, 518, 2232, 539, 518], 49407
    result = client.infer("sed_text_encoder", _inputs(tokens=tokens)).as_numpy("text_features")
    np.testing.assert_allclose(result, session.run(None, {"tokens": tokens})[0], atol=1e-6)
