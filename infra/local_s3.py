"""Start an S3 server on 127.0.0.1 and upload demo adapters, to try the S3 path by hand.

    python infra/local_s3.py            # prints the variables to export, serves until Ctrl-C
    export AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
    hotswap validate s3://hotswap-demo/demo/v2

Uses moto's server (pip install "moto[server]", in the dev extra). Demo adapters fit the
built-in tiny model: v1 (r=8, q/v), v2 (r=16, all projections), v3 (r=4, o_proj, alpha 32).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path

DEMOS = {
    "demo/v1": dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=1),
    "demo/v2": dict(r=16, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"), seed=2),
    "demo/v3": dict(r=4, lora_alpha=32, target_modules=("o_proj",), seed=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default="hotswap-demo")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    from hotswap.builtin import materialize_builtin_model, write_random_adapter
    from hotswap.settings import default_cache_dir
    from hotswap.store import AdapterFetcher, LocalStore, S3Store, make_s3_client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{args.port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    client = make_s3_client(connect_timeout_s=5, read_timeout_s=30)
    client.create_bucket(Bucket=args.bucket)
    base = materialize_builtin_model("tiny-llama", cache_dir=default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        fetcher = AdapterFetcher(cache_dir=Path(tmp), local=LocalStore(Path(tmp), max_adapter_bytes=1 << 30),
                                 s3=S3Store(client, max_adapter_bytes=1 << 30))
        for name, params in DEMOS.items():
            folder = write_random_adapter(base, Path(tmp) / name, **params)
            fetcher.push(folder, f"s3://{args.bucket}/{name}")
            print(f"uploaded s3://{args.bucket}/{name}")
    print(f"\nS3 on http://127.0.0.1:{args.port}; in another shell:\n"
          f"  export AWS_ENDPOINT_URL_S3=http://127.0.0.1:{args.port} AWS_ACCESS_KEY_ID=test "
          "AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1\nCtrl-C stops it.")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
