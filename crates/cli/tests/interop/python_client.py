"""Interop check: a Python client built from proto/ with grpcio-tools stubs.

It encrypts with `cryptography.fernet` (the reference implementation of the
token format), submits through mutual TLS, verifies the server's SHA-256 of
the plaintext, and decrypts a token that the Rust side made. It prints one
JSON object for the Rust test to check.

usage: python_client.py --stubs DIR --target HOST:PORT --ca CA --cert CERT
                        --key KEY --fernet-key FILE [--rust-token TOKEN]
"""

import argparse
import hashlib
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--fernet-key", required=True)
    parser.add_argument("--rust-token")
    parser.add_argument("--message", default="Sensitive data from Python")
    args = parser.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    from cryptography.fernet import Fernet, InvalidToken
    from securemesh.v1 import data_pb2, data_pb2_grpc

    # The first key encrypts; blank lines and `#` comments are not keys.
    with open(args.fernet_key, "rb") as handle:
        keys = [
            line.strip()
            for line in handle
            if line.strip() and not line.strip().startswith(b"#")
        ]
    fernet = Fernet(keys[0])

    def read(path):
        with open(path, "rb") as handle:
            return handle.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    result = {}
    with grpc.secure_channel(args.target, credentials) as channel:
        stub = data_pb2_grpc.DataServiceStub(channel)
        plaintext = args.message.encode()
        reply = stub.Submit(
            data_pb2.SubmitRequest(token=fernet.encrypt(plaintext)), timeout=10
        )
        result["result"] = reply.result
        result["server_id"] = reply.server_id
        result["sha256_matches"] = (
            reply.plaintext_sha256 == hashlib.sha256(plaintext).digest()
        )

        # A token under another key must be refused with INVALID_ARGUMENT.
        try:
            stub.Submit(
                data_pb2.SubmitRequest(
                    token=Fernet(Fernet.generate_key()).encrypt(b"x")
                ),
                timeout=10,
            )
            result["foreign_token"] = "accepted"
        except grpc.RpcError as error:
            result["foreign_token"] = error.code().name

    result["python_token"] = fernet.encrypt(args.message.encode()).decode()
    if args.rust_token:
        try:
            result["rust_token_plaintext"] = fernet.decrypt(
                args.rust_token.encode()
            ).decode()
        except InvalidToken:
            result["rust_token_plaintext"] = None

    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
