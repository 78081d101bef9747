"""Drives wick-serve with an unmodified third-party Open Inference Protocol
client (Triton's `tritonclient[http]`), JSON and binary, and checks what it
gets back. Not run by CI (it needs PyPI's tritonclient):

    .venv/bin/pip install 'tritonclient[http]' numpy
    cargo build --release -p wick-serve
    .venv/bin/python scripts/check_oip_client.py [--server target/release/wick-serve]

Starts the server on a free loopback port (built-in ResNet18, seeded
weights), then: server live / ready / metadata, model metadata / ready,
inference at batch 1 and 3 with JSON tensors and with binary tensors both
ways, the two answers compared (they must be equal), and a request the
model must refuse (wrong shape) answered with the protocol's error.
Prints one line per check; exits non-zero on the first failure.
"""

import argparse
import subprocess
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="target/release/wick-serve")
    args = parser.parse_args()
    server = subprocess.Popen(
        [args.server, "--addr", "127.0.0.1:0", "--max-body-bytes", "16000000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline().strip()
        url = line.removeprefix("listening on http://")
        run_checks(url)
    finally:
        server.terminate()
        server.wait(timeout=30)


def check(what, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        sys.exit(1)


def run_checks(url):
    client = httpclient.InferenceServerClient(url=url)
    check("server live", client.is_server_live())
    check("server ready", client.is_server_ready())
    meta = client.get_server_metadata()
    check(f"server metadata {meta}", "binary_tensor_data" in meta["extensions"])
    model = client.get_model_metadata("resnet18")
    check(f"model metadata inputs {model['inputs']} outputs {model['outputs']}",
          model["inputs"][0]["shape"] == [-1, 3, 224, 224] and model["outputs"][0]["shape"] == [-1, 1000])
    check("model ready", client.is_model_ready("resnet18"))
    check("unknown model not ready", not client.is_model_ready("resnet50"))
    input_name, output_name = model["inputs"][0]["name"], model["outputs"][0]["name"]
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.uniform(-1, 1, size=(batch, 3, 224, 224)).astype(np.float32)
        answers = {}
        for binary in (False, True):
            inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput(output_name, binary_data=binary)
            result = client.infer("resnet18", [inp], outputs=[out], request_id=f"b{batch}")
            y = result.as_numpy(output_name)
            answers[binary] = y
            check(f"infer batch {batch} {'binary' if binary else 'JSON'}: output {y.shape}, id {result.get_response().get('id')}",
                  y.shape == (batch, 1000) and np.isfinite(y).all())
        check(f"batch {batch}: JSON and binary answers equal", np.array_equal(answers[False], answers[True]))
    bad = httpclient.InferInput(input_name, [1, 3, 100, 100], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 100, 100), np.float32))
    try:
        client.infer("resnet18", [bad])
        check("wrong shape refused", False)
    except InferenceServerException as e:
        check(f"wrong shape refused: {e.status()} {e.message()}", "the model takes" in e.message())


if __name__ == "__main__":
    main()
